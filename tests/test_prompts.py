"""What a model is given for an OpenAI request: chat messages through the checkpoint's chat
template (transformers' own `apply_chat_template`), BOS where the tokenizer adds one, and the
prompt checked against the model's context."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from cluster.prompts import Prompter, PromptError

EMBEDDED = Path(__file__).resolve().parents[1] / "countdown" / "model"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model's files, its tokenizer made to add a BOS (as Llama's does), with a chat template."""
    folder = tmp_path_factory.mktemp("chat")
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(EMBEDDED / name, folder / name)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens(["<s>"])
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<eos>",
              "chat_template": TEMPLATE}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_the_embedded_model_has_no_template_and_no_bos() -> None:
    prompter = Prompter(EMBEDDED)
    assert prompter.chat([{"role": "system", "content": "a"}, {"role": "user", "content": "1 2>3\n"}]) == "a1 2>3\n"
    assert prompter.completion("1 2>3\n") == "1 2>3\n"
    assert prompter.context == 2048


def test_a_chat_template_is_applied_with_the_generation_prompt_and_one_bos(chat_checkpoint: Path) -> None:
    prompter = Prompter(chat_checkpoint)
    text = prompter.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<s><|system|>be brief\n<|user|>hi\n<|assistant|>"
    tokenizer = Tokenizer.from_file(str(chat_checkpoint / "tokenizer.json"))
    bos = tokenizer.token_to_id("<s>")
    ids = tokenizer.encode(text, add_special_tokens=False).ids  # as the engine encodes prompts
    assert ids[0] == bos and ids.count(bos) == 1
    completion = prompter.completion("12 5>7\n")  # the BOS the tokenizer would add, as text
    assert tokenizer.encode(completion, add_special_tokens=False).ids == tokenizer.encode("12 5>7\n").ids


def test_a_prompt_longer_than_the_context_is_refused_with_the_figures() -> None:
    prompter = Prompter(EMBEDDED)
    prompter.check(["1 2>3\n"])
    with pytest.raises(PromptError, match=r"maximum context length is 2048 tokens\. However, the prompt has"):
        prompter.check(["1 2>3\n", "1 " * 2100])
