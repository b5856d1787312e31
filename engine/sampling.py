"""Sampling parameters per thread and turning a step's logits into next tokens.

Everything stays on the logits' device (each thread's generator lives there too): a step
reads back only its sampled ids, and, for threads that ask, their log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None  # per-thread generator: same seed, same output
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    ignore_eos: bool = False
    logprobs: int | None = None  # report each sampled token's logprob and this many likeliest (None: no)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


MAX_LOGPROBS = 20  # likeliest alternatives reported per token, at most (OpenAI's limit)


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """A token of a thread's output under the model: its log-probability (None: the token was
    inserted, e.g. a join's text, not sampled) and the step's likeliest tokens (id, logprob)."""

    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of `logits` (B, vocab), each row with its own params and generator
    (on the logits' device); one read back to the host, of the B ids."""
    tokens = logits.argmax(dim=-1)  # (B,) greedy rows, all at once
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, gen)
    return tokens.tolist()


def token_logprobs(logits: torch.Tensor, tokens: list[int], counts: list[int]) -> list[TokenLogprob]:
    """Row i's sampled token `tokens[i]` under the model's distribution (before temperature and
    cuts, as OpenAI reports it) with the `counts[i]` likeliest tokens; `logits` (B, vocab)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, vocab)
    ids = torch.tensor(tokens, device=logits.device)[:, None]  # (B, 1)
    chosen = logprobs.gather(1, ids)[:, 0].tolist()
    k = max(counts)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], ids[:, :0])  # (B, k)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprob(chosen[i], tuple(zip(top_ids[i][:n], top_values[i][:n], strict=True)))
        for i, n in enumerate(counts)
    ]


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """A 0-d tensor on the logits' device (no read back here)."""
    logits = logits.float() / p.temperature  # (vocab,)
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=gen)[0]
