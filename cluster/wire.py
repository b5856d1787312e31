"""Request bodies as the OpenAI API has them, plus Braid's own fields, validated by pydantic
(the answers' shapes: `cluster.answers`).

(No `from __future__ import annotations` here: FastAPI reads these models' annotations at
run time.)
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.protocols import PROTOCOLS
from engine.sampling import MAX_LOGPROBS
from engine.threads import JOIN_POLICIES, MAX_LATENCY_S

MAX_TOKENS = 8192
DEFAULT_MAX_TOKENS = 1024  # a request that gives no limit: this many tokens, over all its threads
MAX_CHOICES = 16  # choices per request: prompts x n
# `stop` strings are looked for at every token a thread writes, under the engine's lock:
# as many as OpenAI allows, and short.
MAX_STOPS = 4
MAX_STOP_CHARS = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # usage in one last chunk, with no choices


class BraidFields(BaseModel):
    """The fields both endpoints share: OpenAI's (honoured, or accepted where they ask for
    nothing Braid would do differently, else refused by name) and Braid's own."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    # Accepted, and nothing to do: who asks, and OpenAI's own bookkeeping.
    user: str | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Accepted at the values that change nothing (`_neutral`).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    # Braid's own.
    max_latency_s: float | None = Field(None, gt=0.0, le=MAX_LATENCY_S)
    max_threads: int | None = Field(None, ge=1, le=256)
    max_depth: int | None = Field(None, ge=0, le=8)
    protocol: str | None = None
    join_policy: str | None = None
    # How a prompt's n samples answer it (actors.join): all (n choices), vote, first_success.
    sample_join: Literal["all", "vote", "first_success"] = "all"
    thread_events: bool = False  # a stream also carries an event per thread forked or ended
    timeline: bool = False  # the answer's `braid.timeline_svg`: its thread timeline as an SVG picture

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """A field sent as null is a field not sent (some clients send every field)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop: str | list[str] | None) -> str | list[str] | None:
        texts = [stop] if isinstance(stop, str) else stop or []
        if len(texts) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(texts)}")
        if any(not 0 < len(text) <= MAX_STOP_CHARS for text in texts):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stop

    @model_validator(mode="after")
    def _neutral(self) -> "BraidFields":
        """A field Braid cannot honour is refused by name, not ignored."""
        for name, value, neutral in self.unsupported():
            if value != neutral and not (neutral is None and not value):
                shown = "not set" if neutral is None else repr(neutral)
                raise ValueError(f"{name}={value!r} is not supported by Braid (only {shown})")
        return self

    def unsupported(self) -> list[tuple[str, Any, Any]]:
        """(field, its value, the one value Braid takes); None: unset or empty."""
        return [
            ("frequency_penalty", self.frequency_penalty, 0.0), ("presence_penalty", self.presence_penalty, 0.0),
            ("repetition_penalty", self.repetition_penalty, 1.0), ("logit_bias", self.logit_bias, None),
        ]  # fmt: skip

    def requested_tokens(self) -> int | None:
        """The completion's token limit the request gave (None: none)."""
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        """How many likeliest tokens to report with each token's logprob (None: no logprobs)."""
        return None

    def options(self, defaults: dict[str, Any], max_tokens: int) -> dict[str, Any]:
        """Braid options for the coordinator (a ValueError names a bad value), with the
        completion's token limit `max_tokens` (checked against the context by the caller)."""
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
        options["max_total_tokens"] = max_tokens
        options["sampling"] = {
            "max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "stop": tuple(stop), "logprobs": self.logprobs_count(),
        }  # fmt: skip
        return options


class CompletionRequest(BraidFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the likeliest tokens to report per token
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or not all(isinstance(p, str) for p in prompt)):
            raise ValueError("a list of prompts must hold 1 or more strings (token-id prompts are not supported)")
        if any(not p for p in ([prompt] if isinstance(prompt, str) else prompt)):
            raise ValueError("a prompt must not be empty")
        return prompt

    @model_validator(mode="after")
    def _choices(self) -> "CompletionRequest":
        choices = len(self.prompts()) * self.n
        if choices > MAX_CHOICES:
            raise ValueError(f"at most {MAX_CHOICES} choices a request (prompts x n), got {choices}")
        return self

    def unsupported(self) -> list[tuple[str, Any, Any]]:
        return [*super().unsupported(), ("echo", self.echo, False), ("suffix", self.suffix, None),
                ("best_of", self.best_of, None if self.best_of is None else self.n)]  # fmt: skip

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(BraidFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)  # what the SDK sends today
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, Any, Any]]:
        text_only = None if self.response_format in (None, {"type": "text"}) else self.response_format
        no_tool = None if self.tool_choice in (None, "none", "auto") else self.tool_choice
        return [*super().unsupported(), ("tools", self.tools, None), ("tool_choice", no_tool, None),
                ("response_format", text_only, None)]  # fmt: skip

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]
