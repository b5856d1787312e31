"""What a task adds to serving a model, and how tasks and verifiers plug in.

A task gives the join's verifier and success test for children, how a request's fan-out
is narrowed under load, the prompts that warm the admission's cost estimates up, what a
sample's final answer is (for a vote across samples), and which answers are right (goodput
counts only those; best-of-n and `first_success` across samples take the first right one).

Tasks and verifiers are named by import path, "module:attribute", as Ray Serve names its
applications: `task("countdown.serving:TASK")`, `load_verifier("my_checks:is_right")`.
Two tasks are built in by name: "none" (any model, its protocol's own rules) and
"countdown" (the embedded model's). Nothing here imports a task: a replica serving a
user's model never loads Countdown.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

AnswerCheck = Callable[[str, str], bool]  # (request prompt, answer text) -> right
Verifier = Callable[[str, str], bool]  # (request prompt, child's text) -> whether its claim holds (engine.forkjoin)


@dataclass(slots=True, frozen=True)
class Task:
    verifier: Verifier | None = None  # (request prompt, child's text) -> whether its claim holds
    succeeded: Callable[[str], bool] | None = None  # a child's text claims success (default: the protocol's)
    accepted: AnswerCheck | None = None  # (prompt, answer) -> right; None: every answer counts
    # Fan-out caps the coordinator chooses from, widest first (None: the request's own). With
    # `cap_prompt` the cap is written into the prompt (a model trained to follow it); else it
    # caps the request's `max_threads`.
    widths: tuple[int | None, ...] = (None, 4, 2, 1)
    cap_prompt: Callable[[str, int | None], str] | None = None
    warm_up: tuple[str, ...] = ()  # prompts run at every width when the cluster starts
    options: dict[str, Any] = field(default_factory=dict)  # request options it is served with by default
    answer: Callable[[str], str] = str.strip  # a sample's final answer, as votes compare it

    def narrow(self, text: str, options: dict[str, Any], width: int | None) -> tuple[str, dict[str, Any]]:
        """The request's prompt and options with its fan-out capped at `width`."""
        if width is None:
            return text, options
        if self.cap_prompt is not None:
            return self.cap_prompt(text, width), options
        return text, {**options, "max_threads": min(width, options.get("max_threads") or width)}


NONE = Task()
BUILT_IN = {"none": "actors.tasks:NONE", "countdown": "countdown.serving:TASK"}


def load(path: str, what: str) -> Any:
    """The attribute an import path "module:attribute" names; ValueError saying what is wrong."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} {path!r} is not an import path of the form module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {path!r}: cannot import {module_name!r}: {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{what} {path!r}: module {module_name!r} has no {attribute!r}") from None


@cache
def task(name: str, verifier: str | None = None) -> Task:
    """The task `name` (built in, or an import path to a `Task`), its answer check replaced by
    the function the import path `verifier` names, when given."""
    found = load(BUILT_IN.get(name, name), "task")
    if not isinstance(found, Task):
        raise ValueError(f"task {name!r} is a {type(found).__name__}, not an actors.tasks.Task")
    return found if verifier is None else replace(found, accepted=load_verifier(verifier))


def load_verifier(path: str) -> AnswerCheck:
    """The verifier the import path names: a function (prompt, answer text) -> bool."""
    found = load(path, "verifier")
    if not callable(found):
        raise ValueError(f"verifier {path!r} is a {type(found).__name__}, not a function (prompt, text) -> bool")
    return found
