"""What a task adds to serving a model: the join's verifier and success test, how a
request's fan-out is narrowed under load, the prompts that warm the admission's cost
estimates up, and what counts as a right answer (goodput counts only those).

`TASKS[name]`; "none" serves any model with its protocol's own rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from countdown import problems
from countdown.traces import SERVE_OPTIONS, cap_prompt, prompt
from countdown.verify import answer_accepted, claims_found, verify_claim
from engine.forkjoin import Verifier


@dataclass(slots=True, frozen=True)
class Task:
    verifier: Verifier | None = None  # (request prompt, child's text) -> whether its claim holds
    succeeded: Callable[[str], bool] | None = None  # a child's text claims success (default: the protocol's)
    accepted: Callable[[str, str], bool] | None = None  # (prompt, answer) -> right; None: every answer counts
    # Fan-out caps the coordinator chooses from, widest first (None: the request's own). With
    # `cap_prompt` the cap is written into the prompt (a model trained to follow it); else it
    # caps the request's `max_threads`.
    widths: tuple[int | None, ...] = (None, 4, 2, 1)
    cap_prompt: Callable[[str, int | None], str] | None = None
    warm_up: tuple[str, ...] = ()  # prompts run at every width when the cluster starts
    options: dict[str, Any] = field(default_factory=dict)  # request options it is served with by default

    def narrow(self, text: str, options: dict[str, Any], width: int | None) -> tuple[str, dict[str, Any]]:
        """The request's prompt and options with its fan-out capped at `width`."""
        if width is None:
            return text, options
        if self.cap_prompt is not None:
            return self.cap_prompt(text, width), options
        return text, {**options, "max_threads": min(width, options.get("max_threads") or width)}


WARM_UP_PROBLEMS = 4  # x 2 fan-out caps, at once: enough threads to fill a step (max_step_threads)


def _countdown_warm_up() -> tuple[str, ...]:
    return tuple(prompt(p) for p in problems.splits(0, WARM_UP_PROBLEMS, 0)["validation"])


TASKS = {
    "none": Task(),
    # The root's `T<n>` cap is what the embedded model was trained to follow; T2 solves as many
    # as the uncapped search at half its tokens (README), T1 and T4 are dominated by these two.
    "countdown": Task(
        verify_claim, claims_found, answer_accepted, (None, 2), cap_prompt, _countdown_warm_up(), SERVE_OPTIONS
    ),
}
