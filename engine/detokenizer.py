"""Incremental detokenization: text deltas as tokens arrive, never splitting a character."""

from __future__ import annotations

from tokenizers import Tokenizer


class IncrementalDetokenizer:
    """Decodes a growing token list, emitting only text that can no longer change.

    Decoding a window that starts a few tokens back (`prefix_offset`) keeps merges and
    leading spaces right; a trailing U+FFFD means a multi-byte character is incomplete,
    so nothing is emitted until the next token completes it (or the thread ends: `flush`).
    Special tokens (EOS, padding) are left out; protocol tags belong in the vocabulary as
    ordinary added tokens, so they stay in the text.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """At the end of a thread: whatever is held back, even an incomplete character."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        window = self.token_ids[self.prefix_offset :]
        prefix = self.tokenizer.decode(window[: self.read_offset - self.prefix_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(window, skip_special_tokens=True)
        if not final and (len(full) <= len(prefix) or full.endswith("\ufffd")):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += delta
        return delta
