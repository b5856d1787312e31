"""What goes over the wire: request bodies as the OpenAI API has them plus Braid's own fields
(validated by pydantic), and OpenAI-shaped answers, stream chunks and thread events.

(No `from __future__ import annotations` here: FastAPI reads these models' annotations at
run time.)
"""

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cluster.timeline import render_svg
from engine.protocols import PROTOCOLS
from engine.threads import JOIN_POLICIES, MAX_LATENCY_S

MAX_TOKENS = 8192
# `stop` strings are looked for at every token a thread writes, under the engine's lock:
# as many as OpenAI allows, and short.
MAX_STOPS = 4
MAX_STOP_CHARS = 256


class BraidFields(BaseModel):
    """Braid's own fields, and the OpenAI sampling fields Braid honours."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int = Field(1024, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    user: str | None = None
    max_latency_s: float | None = Field(None, gt=0.0, le=MAX_LATENCY_S)
    max_threads: int | None = Field(None, ge=1, le=256)
    max_depth: int | None = Field(None, ge=0, le=8)
    protocol: str | None = None
    join_policy: str | None = None
    timeline: bool = False  # the answer's `braid.timeline_svg`: its thread timeline as an SVG picture

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop: str | list[str] | None) -> str | list[str] | None:
        texts = [stop] if isinstance(stop, str) else stop or []
        if len(texts) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(texts)}")
        if any(not 0 < len(text) <= MAX_STOP_CHARS for text in texts):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stop

    def options(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Braid options for the coordinator (a ValueError names a bad value)."""
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; known: {', '.join(PROTOCOLS)}")
        if self.join_policy is not None and self.join_policy not in JOIN_POLICIES:
            raise ValueError(f"unknown join_policy {self.join_policy!r}; known: {', '.join(JOIN_POLICIES)}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        chosen = {
            "protocol": self.protocol, "join_policy": self.join_policy, "max_threads": self.max_threads,
            "max_depth": self.max_depth, "max_latency_s": self.max_latency_s,
        }  # fmt: skip
        options = {**defaults, **{k: v for k, v in chosen.items() if v is not None}}
        options["max_total_tokens"] = self.max_tokens
        options["sampling"] = {
            "max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "stop": tuple(stop),
        }  # fmt: skip
        return options


class CompletionRequest(BraidFields):
    prompt: str = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BraidFields):
    messages: list[ChatMessage] = Field(min_length=1)

    def prompt(self) -> str:
        """The models Braid ships have no chat template: the prompt is the messages' text in order."""
        return "".join(m.content for m in self.messages)


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


class Shape:
    """OpenAI's response and chunk objects for one request."""

    def __init__(self, request_id: str, model: str, chat: bool, options: dict, timeline: bool = False) -> None:
        self.id, self.model, self.chat, self.options, self.timeline = request_id, model, chat, options, timeline
        self.created = int(time.time())
        self.started = False

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text: str, finish_reason: str | None, chunk: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if chunk:
            delta: dict[str, str] = {"content": text} if text else {}
            if not self.started:
                delta["role"] = "assistant"
                self.started = True
            return {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}

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
            },
            "fanout_cap": result.get("fanout_cap"),
            "accepted": result.get("accepted"),
            "threads": result["threads"],
        }
        if self.timeline:
            braid["timeline_svg"] = render_svg(result)
        return braid

    @staticmethod
    def usage(result: dict) -> dict:
        u = result["usage"]
        return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["generated_tokens"],
                "total_tokens": u["total_tokens"]}  # fmt: skip

    @staticmethod
    def finish_reason(result: dict) -> str:
        return "stop" if result["finish_reason"] == "stop" else "length"  # deadline, out_of_blocks: cut short

    def response(self, result: dict) -> dict:
        choice = self._choice(result["text"], self.finish_reason(result), chunk=False)
        return {**self._base(False), "choices": [choice], "usage": self.usage(result), "braid": self.braid(result)}

    def chunk(self, text: str) -> dict:
        return {**self._base(True), "choices": [self._choice(text, None, chunk=True)]}

    def thread_event(self, event: dict) -> dict:
        return {**self._base(True), "choices": [], "braid": {k: v for k, v in event.items() if k != "type"}}

    def last_chunk(self, result: dict) -> dict:
        choice = self._choice("", self.finish_reason(result), chunk=True)
        return {**self._base(True), "choices": [choice], "usage": self.usage(result), "braid": self.braid(result)}
