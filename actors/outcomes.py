"""What a request's caller meets, shared by the coordinator, the Join actor and the ingress
(kept light: a Join actor starts per request and imports only this, Ray and the task):
the errors a request ends with, its time limit, and reading a Ray stream."""

from __future__ import annotations

from typing import Any, TypeVar

LATE_GRACE_S = 10.0  # a budgeted request runs at most this long past its budget

E = TypeVar("E", bound=BaseException)


class ReplicaFailed(RuntimeError):
    """Every replica a request was tried on failed, or its deadline passed while retrying."""


class RequestTimedOut(RuntimeError):
    """The request ran past its time (`request_timeout_s`, or its budget plus LATE_GRACE_S)."""


class Refused(RuntimeError):
    """Not admitted: `status` is the HTTP status to answer (429 busy, 503 budget cannot be met
    now), `retry_after_s` when to try again."""

    def __init__(self, status: int, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(status, reason, retry_after_s)  # all in args: Ray pickles it to the caller
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


def cause(error: BaseException | None, kind: type[E]) -> E | None:
    """The coordinator's error of `kind` (Refused, RequestTimedOut), out of Ray's wrapping."""
    while error is not None:
        if isinstance(error, kind):
            return error
        error = getattr(error, "cause", None)
    return None


def time_limit_s(options: dict[str, Any], request_timeout_s: float) -> float:
    """The longest a request with `options` (as it arrived) runs, from its arrival."""
    budget = options.get("max_latency_s")
    return request_timeout_s if budget is None else min(request_timeout_s, budget + LATE_GRACE_S)


async def next_event(events: Any) -> dict | None:
    """A Ray stream's (ObjectRefGenerator's) next item; None at its end."""
    try:
        return await (await events.__anext__())
    except StopAsyncIteration:
        return None
