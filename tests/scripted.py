"""A real engine whose sampling is forced: each thread emits a scripted text.

The model runs for real (KV written, logits computed); a logits processor then masks
every token but the script's next one. A thread's script is chosen by the end of its
prompt (the longest key that the prompt text ends with), so children of a fork, which
all start with the parent's context, are told apart by their own first tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from engine.engine import Engine
from engine.scheduler import Thread
from tests.checkpoints import byte_tokenizer, make_checkpoint, tiny_config

TAGS = [
    "<Parallel>", "</Parallel>", "<Goal>", "</Goal>", "<Outline>", "</Outline>", "<Path>", "</Path>",
    "<Conclusion>", "</Conclusion>", "<Outlines>", "</Outlines>", "<Thread>", "</Thread>",
    "<Calling Sub Searches>", "<End Calling Sub Searches>", "<Sub Searches>", "<End Sub Searches>",
    "<Goal Reached>", "<No Solution>",
]  # fmt: skip
EOS = "<eos>"


def protocol_tokenizer(tags_as_tokens: bool) -> Tokenizer:
    tokenizer = byte_tokenizer()
    if tags_as_tokens:
        tokenizer.add_tokens(TAGS)
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def make_protocol_checkpoint(folder: Path, arch: str = "llama", tags_as_tokens: bool = True) -> Path:
    tokenizer = protocol_tokenizer(tags_as_tokens)
    config = tiny_config(arch)
    config.vocab_size = tokenizer.get_vocab_size()
    config.eos_token_id = tokenizer.token_to_id(EOS)
    make_checkpoint(arch, folder, config=config)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


class Scripts:
    """Logits processor: thread -> scripted text, ended by EOS; records real logits too."""

    def __init__(self, tokenizer: Tokenizer, scripts: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.token_to_id(EOS)
        self.scripts = {key: tokenizer.encode(text).ids + [self.eos] for key, text in scripts.items()}
        self.seen: dict[tuple[int, int], torch.Tensor] = {}  # (thread id, tokens generated) -> logits
        self.chosen: dict[int, list[int]] = {}  # thread id -> its script

    def script_for(self, thread: Thread) -> list[int]:
        if thread.thread_id not in self.chosen:
            prompt = self.tokenizer.decode(thread.token_ids[: thread.num_prompt_tokens], skip_special_tokens=False)
            keys = [k for k in self.scripts if prompt.endswith(k)]
            if not keys:
                raise KeyError(f"no script for a thread whose prompt ends with {prompt[-40:]!r}")
            self.chosen[thread.thread_id] = self.scripts[max(keys, key=len)]
        return self.chosen[thread.thread_id]

    def __call__(self, threads: list[Thread], logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        for row, thread in enumerate(threads):
            self.seen[(thread.thread_id, thread.num_generated)] = logits[row].clone()
            script = self.script_for(thread)
            token = script[thread.num_generated] if thread.num_generated < len(script) else self.eos
            forced[row, token] = 0.0
        return forced


def scripted_engine(checkpoint: Path, scripts: dict[str, str], **kwargs: object) -> tuple[Engine, Scripts]:
    kwargs = {"kv_cache_bytes": 8 * 2**20, "block_size": 8, **kwargs}
    engine = Engine(checkpoint, **kwargs)
    processor = Scripts(engine.tokenizer, scripts)
    engine.logits_processor = processor
    return engine, processor
