"""The text a model is given for an OpenAI request, and the checks against its context.

Chat messages go through the checkpoint's chat template (`apply_chat_template` with the
generation prompt), as vLLM does; a checkpoint without one (the embedded Countdown model)
gets the messages' text in order. A completion's prompt gets the tokenizer's BOS text in
front when the tokenizer adds one (Llama), since the engine encodes prompts without
special tokens: the BOS text then encodes to the BOS id, and a chat template's own BOS is
not doubled.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

MAX_PROMPT_TOKENS = 4096  # a prompt over this is refused whatever the model's context


class PromptError(ValueError):
    """A prompt the model cannot take (the message says why, for an HTTP 400)."""


class Prompter:
    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config = json.loads((path / "config.json").read_text())
        self.context = int(config["max_position_embeddings"])
        self.template = _chat_tokenizer(path)
        added = self.tokenizer.encode("", add_special_tokens=True).ids
        self.bos = self.tokenizer.id_to_token(added[0]) if added else ""

    def completion(self, prompt: str) -> str:
        return self.bos + prompt

    def chat(self, messages: list[dict[str, str]]) -> str:
        if self.template is None:
            return "".join(m["content"] for m in messages)
        try:
            return self.template.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template's own checks (roles in order, ...): jinja raises plainly
            raise PromptError(f"the model's chat template refused the messages: {error}") from error

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def check(self, prompts: list[str]) -> None:
        """A PromptError unless every prompt leaves room in the model's context (and is at most
        MAX_PROMPT_TOKENS). The completion's limit is the request's total over its threads; each
        thread ends ("length") when its own context is full."""
        longest = max(self.count(p) for p in prompts)
        limit = min(MAX_PROMPT_TOKENS, self.context - 1)
        if longest > limit:
            raise PromptError(
                f"This model's maximum context length is {self.context} tokens. However, the prompt has {longest} "
                f"tokens (at most {limit} here). Please reduce the length of the prompt."
            )

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer when it has a chat template (in tokenizer_config.json or
    chat_template.jinja), for `apply_chat_template`; else None."""
    config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").exists() or (
        config.exists() and json.loads(config.read_text()).get("chat_template")
    )
    return AutoTokenizer.from_pretrained(str(path)) if has_template else None
