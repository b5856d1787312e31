"""Exact checks for Countdown: an answer's arithmetic re-done with every input used once,
and the join verifier that rejects a child's wrong "found" before it reaches its parent."""

from __future__ import annotations

import itertools
import re

from countdown.problems import Problem, apply

EQUATION = re.compile(r"(\d+)([+\-*/])(\d+)=(\d+)")
TARGET = re.compile(r">(\d+)\s*$")
PROMPT = re.compile(r"(?:T\d+ )?((?:\d+ )*\d+)>(\d+)")


def equations(text: str) -> list[tuple[int, str, int, int]]:
    return [(int(a), op, int(b), int(r)) for a, op, b, r in EQUATION.findall(text)]


def correct(a: int, op: str, b: int, r: int) -> bool:
    return apply(a, op, b) == r


def check_answer(problem: Problem, answer: str) -> bool:
    """True when `answer` holds 3 equations that, done exactly, use each input once and end at the target."""
    eqs = equations(answer)
    if len(eqs) != len(problem.nums) - 1:
        return False
    available = list(problem.nums)
    for a, op, b, r in eqs:
        for operand in (a, b):
            if operand not in available:
                return False
            available.remove(operand)
        if not correct(a, op, b, r):
            return False
        available.append(r)
    return available == [problem.target]


def conclusion(text: str) -> str:
    """A thread's own last line (before its closing tag): what it concluded."""
    lines = [line for line in text.replace("</Thread>", "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def claims_found(text: str) -> bool:
    return conclusion(text).endswith("found")


def verify_claim(prompt: str, text: str) -> bool:
    """The join verifier: a child concluding "found" must show a correct chain ending at the
    target (each equation after the first uses the previous result); a chain as long as a
    whole answer (the model's children write the chain from the root's numbers) must be a
    right answer to the prompt's problem, each input used exactly once. Other children pass."""
    if not claims_found(text):
        return True
    chain = conclusion(text)
    problem = problem_of(prompt)
    eqs = equations(chain)
    if problem is not None and len(eqs) >= len(problem.nums) - 1:
        return check_answer(problem, chain)
    target = TARGET.search(prompt.strip().splitlines()[0] if prompt.strip() else "")
    if target is None or not eqs or eqs[-1][3] != int(target.group(1)):
        return False
    if not all(correct(*eq) for eq in eqs):
        return False
    return all(prev[3] in (eq[0], eq[2]) for prev, eq in itertools.pairwise(eqs))


def final_answer(text: str) -> str:
    """The root's answer: the first line after its last fork block ends (or its last line)."""
    tail = text.rsplit("</Parallel>", 1)[-1] if "</Parallel>" in text else text.rsplit("}", 1)[-1]
    lines = [line for line in tail.splitlines() if line.strip()]
    return lines[0] if lines else ""


def problem_of(prompt: str) -> Problem | None:
    """The problem a Countdown prompt states (`[T<n> ]a b c d>target`), or None."""
    match = PROMPT.fullmatch(prompt.strip().splitlines()[-1].strip()) if prompt.strip() else None
    if match is None:
        return None
    return Problem(tuple(int(n) for n in match.group(1).split()), int(match.group(2)))


def answer_accepted(prompt: str, text: str) -> bool:
    """Whether a served answer solves the problem its prompt states (what counts as goodput)."""
    problem = problem_of(prompt)
    return problem is not None and check_answer(problem, final_answer(text))
