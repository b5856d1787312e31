"""OpenAI-shaped answers: responses, stream chunks and Braid's thread events, for one request
of one or more choices (prompts x n), with logprobs when asked for; and how an answer went
against its latency budget.

A stream is plain OpenAI unless the request asks for more: text chunks, each choice's last
chunk with its `finish_reason` (and Braid's thread tree in `braid`), then, with
`stream_options.include_usage`, one chunk with the usage and no choices (the only chunk
without). Thread events (`thread_events: true`) ride in chunks with an empty delta.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from cluster.timeline import render_svg


def sla_outcome(result: dict, options: dict) -> str | None:
    """How a request with a latency budget did (None: it had none): "met" when it ended on its
    own (its answer, a stop) inside the budget; "late" when it ended on its own after it;
    "truncated" when it was cut (at its deadline, or at its token or KV limit) — a miss
    however soon it came back."""
    budget = options.get("max_latency_s")
    if budget is None:
        return None
    if result["finish_reason"] != "stop":
        return "truncated"
    return "met" if result["latency_s"] <= budget else "late"


def good_answer(result: dict, options: dict) -> bool:
    """Whether a request counts toward goodput: it ended on its own, inside its budget if it had
    one, and its answer passed the task's check if there is one (`accepted`)."""
    return result["finish_reason"] == "stop" and sla_outcome(result, options) in (None, "met") and \
        result.get("accepted") is not False  # fmt: skip


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def finish_reason(result: dict) -> str:
    return "stop" if result["finish_reason"] == "stop" else "length"  # deadline, out_of_blocks: cut short


class Shape:
    """OpenAI's response and chunk objects for one request. Choice `i` answers prompt
    `i // n`; `token_text` turns a token id into its text (for logprobs)."""

    def __init__(
        self, request_id: str, model: str, chat: bool, options: dict, n: int = 1, timeline: bool = False,
        include_usage: bool = False, token_text: Callable[[int], str] = str,
    ) -> None:  # fmt: skip
        self.id, self.model, self.chat, self.options, self.n = request_id, model, chat, options, n
        self.timeline, self.include_usage, self.token_text = timeline, include_usage, token_text
        self.created = int(time.time())
        self.started: set[int] = set()  # chat choices whose role was sent
        self.offsets: dict[int, int] = {}  # completion choices' text offsets so far (logprobs)

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        base = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if chunk and self.include_usage:
            base["usage"] = None  # as OpenAI: null in every chunk but the last
        return base

    def _choice(self, index: int, text: str, reason: str | None, chunk: bool, logprobs: dict | None) -> dict:
        shaped = self._logprobs(index, logprobs)
        if not self.chat:
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": shaped}
        if chunk:
            delta: dict[str, str] = {"content": text} if text else {}
            if index not in self.started:
                delta["role"] = "assistant"
                self.started.add(index)
            return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": shaped}
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "finish_reason": reason, "logprobs": shaped}

    def _logprobs(self, index: int, logprobs: dict | None) -> dict | None:
        """OpenAI's logprobs of some tokens (`logprobs`: ids, logprobs and top alternatives, see
        `engine.threads.logprobs_dict`); a token a join inserted has logprob null."""
        if logprobs is None:
            return None
        tokens = [self.token_text(t) for t in logprobs["token_ids"]]
        tops = [[(self.token_text(t), lp) for t, lp in top] for top in logprobs["top"]]
        if self.chat:
            content = [
                {"token": token, "logprob": lp, "bytes": list(token.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
                for token, lp, top in zip(tokens, logprobs["logprobs"], tops, strict=True)
            ]  # fmt: skip
            return {"content": content}
        offsets = []
        for token in tokens:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(token)
        return {"tokens": tokens, "token_logprobs": logprobs["logprobs"], "text_offset": offsets,
                "top_logprobs": [dict(top) for top in tops]}  # fmt: skip

    def braid(self, result: dict) -> dict:
        outcome = sla_outcome(result, self.options)
        braid = {
            "finish_reason": result["finish_reason"],
            "latency_s": result["latency_s"],
            "replica": result["replica"],
            "critical_path_tokens": result["usage"]["critical_path_tokens"],
            "sla": {
                "max_latency_s": self.options.get("max_latency_s"),
                "met": None if outcome is None else outcome == "met",
                "outcome": outcome,
                "predicted_latency_s": result.get("predicted_latency_s"),
                "deadline_shaped": result["deadline_shaped"],  # a fork refused or joined early, a child cut
            },
            "fanout_cap": result.get("fanout_cap"),
            "accepted": result.get("accepted"),
            "threads": result["threads"],
        }
        if "samples" in result:  # a prompt's samples, one chosen (sample_join vote, first_success)
            braid["samples"] = result["samples"]
        if self.timeline:
            braid["timeline_svg"] = render_svg(result)
        return braid

    def usage(self, results: dict[int, dict]) -> dict:
        """Each prompt's tokens once (not once per choice), every choice's completion."""
        prompt = sum(r["usage"]["prompt_tokens"] for i, r in results.items() if i % self.n == 0)
        completion = sum(r["usage"]["generated_tokens"] for r in results.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, results: list[dict]) -> dict:
        """The answer to a request that did not stream: a choice per result, in order; `braid`
        the first choice's, with every choice's under `braid.choices` when there are several."""
        choices = [
            self._choice(i, r["text"], finish_reason(r), False, r.get("logprobs")) for i, r in enumerate(results)
        ]
        braid = self.braid(results[0])
        if len(results) > 1:
            braid["choices"] = [self.braid(r) for r in results]
        return {**self._base(False), "choices": choices, "usage": self.usage(dict(enumerate(results))),
                "braid": braid}  # fmt: skip

    def chunk(self, index: int, text: str, logprobs: dict | None = None) -> dict:
        return {**self._base(True), "choices": [self._choice(index, text, None, True, logprobs)]}

    def thread_event(self, index: int, event: dict) -> dict:
        """A thread forked or ended (asked for with `thread_events`), in a chunk with an empty delta."""
        braid = {k: v for k, v in event.items() if k != "type"}
        return {**self._base(True), "choices": [self._choice(index, "", None, True, None)], "braid": braid}

    def finish_chunk(self, index: int, result: dict) -> dict:
        """Choice `index`'s last chunk: its finish reason and Braid's account of it."""
        choice = self._choice(index, "", finish_reason(result), True, None)
        return {**self._base(True), "choices": [choice], "braid": self.braid(result)}

    def usage_chunk(self, results: dict[int, dict]) -> dict:
        """The stream's last chunk with `include_usage`: no choices, the whole request's usage."""
        return {**self._base(True), "choices": [], "usage": self.usage(results)}
