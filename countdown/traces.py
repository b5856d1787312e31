"""Search traces for Countdown, in two forms of the same search.

The search: the root lists the moves of its two first pairs of numbers (the largest with
the second, the largest with the third; every legal operator) as outlines and forks one
child per outline; each child (3 numbers left) lists every legal move and forks one
grandchild per move; each grandchild (2 numbers left) tries + - * / against the target.
Every step is a rule the model can follow from what is right before it (no ranking, no
look-ahead), and the fan-out is the number of legal moves, so it varies with the problem
(an exact division, a product below 1000, equal numbers). A `T<n> ` prompt prefix caps
the root's fan-out at n.

- parallel (ThreadWeaver format): the whole search as a tree of segments, each thread
  seeing exactly the context Braid gives it — its parent's context, its header
  `<Thread>\\n{i}:`, and, after a join, the children's text as Braid's ThreadWeaver
  protocol writes it. With `first_success`, the join holds the first child that found
  the target, or none of them when none did. Training packs the tree into one sequence
  with a tree attention mask, so a shared context is computed once, not once per thread.
- sequential: the same search in one thread (the APR paper's SoS+ baseline): children
  written inline, in order, until one succeeds; tags become plain characters so Braid
  never forks it.

The prompt lists the numbers in descending order, as every state in the trace does.

An outline carries the move, the numbers it leaves and the target (`44+8=52:52 12 3>43`),
and a thread's header repeats its outline, so every thread computes only from what is
right before it. Example (parallel), prompt `44 12 8 3>43\\n`:

    root:       <Parallel>\\n<Outlines>\\n<Outline>44+12=56:56 8 3>43</Outline>\\n...</Outlines>
    child:      <Thread>\\n3:44+8=52:52 12 3>43\\n<Parallel>\\n<Outlines>\\n<Outline>52+12=64:64 3>43</Outline>...
    grandchild: <Thread>\\n1:52-12=40:40 3>43\\n40+3=43:43 found\\n</Thread>
    child, after its join:  44+8=52,52-12=40,40+3=43 found\\n</Thread>   (the whole chain)
    root, after its join:   44+8=52,52-12=40,40+3=43\\n<eos>           (the line above, copied)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from countdown.problems import Move, Problem, apply, moves

ROOT_PAIRS = 2  # the root forks on the moves of its first two pairs of numbers
SEQUENTIAL_MARKS = {
    "<Parallel>": "{", "</Parallel>": "}", "<Outlines>": "(", "</Outlines>": ")",
    "<Outline>": "[", "</Outline>": "]", "<Thread>": "|", "</Thread>": ";",
}  # fmt: skip


@dataclass(slots=True, frozen=True)
class Segment:
    """A run of one thread's text. The thread sees its segment's chain of parents before it."""

    text: str
    generated: bool  # written by the model (trained on), or given by Braid (prompt, header, join)
    parent: int | None  # index of the segment right before this one in the thread's view
    thread: int  # which thread's stream it is in (0: the root)


@dataclass(slots=True)
class Node:
    """One thread of the search: its fork, its children, its conclusion, what it found."""

    moves: list[Move]  # the moves it lists as outlines
    states: list[tuple[int, ...]]  # the numbers left after each of them
    target: int
    children: list[Node]
    tail: str  # own text after the join (conclusion), or a leaf's whole text
    found: str | None  # the chain of moves it found

    @property
    def winner(self) -> int | None:
        return next((i for i, c in enumerate(self.children) if c.found), None)

    def outline(self, i: int) -> str:
        """An outline: the move, the numbers it leaves and the target, e.g. `44+8=52:52 12 3>43`."""
        return f"{self.moves[i]}:{' '.join(map(str, self.states[i]))}>{self.target}"

    def header(self, i: int) -> str:
        """Child i's header, as Braid's ThreadWeaver protocol writes it."""
        return f"<Thread>\n{i + 1}:{self.outline(i)}\n"

    def fork_text(self) -> str:
        if not self.children:
            return ""
        outlines = "".join(f"<Outline>{self.outline(i)}</Outline>\n" for i in range(len(self.moves)))
        return f"<Parallel>\n<Outlines>\n{outlines}</Outlines>"

    def join_text(self) -> str:
        """What Braid's ThreadWeaver join writes under first_success: the child that found
        the target, or none of them when none did."""
        if not self.children:
            return ""
        joined = [self.winner] if self.winner is not None else []
        return "".join(f"\n{self.header(i)}{self.children[i].text()}" for i in joined) + "\n</Parallel>\n"

    def text(self) -> str:
        return self.fork_text() + self.join_text() + self.tail

    def serial_text(self) -> str:
        """The same thread with its children tried inline, in order, until one succeeds."""
        if not self.children:
            return self.tail
        tried = []
        for i, child in enumerate(self.children):
            tried.append(f"\n{self.header(i)}{child.serial_text()}")
            if child.found:
                break
        return self.fork_text() + "".join(tried) + "\n</Parallel>\n" + self.tail


# How a Countdown request is served: the traces' format, and the first child whose chain the
# verifier accepts is the one joined.
SERVE_OPTIONS = {"protocol": "threadweaver", "join_policy": "first_success"}


def prompt(problem: Problem, threads: int | None = None) -> str:
    cap = f"T{threads} " if threads else ""
    return f"{cap}{' '.join(map(str, sorted(problem.nums, reverse=True)))}>{problem.target}\n"


def cap_prompt(text: str, threads: int | None) -> str:
    """A served prompt with its root's fan-out capped at `threads` (a `T<n> ` prefix; None:
    as it is). A prompt that already has a cap keeps the smaller one."""
    match = re.match(r"T(\d+) ", text)
    if threads is None:
        return text
    if match is None:
        return f"T{threads} {text}"
    return f"T{min(threads, int(match.group(1)))} {text[match.end() :]}"


def search(state: tuple[int, ...], target: int, cap: int | None = None, path: tuple[Move, ...] = ()) -> Node:
    """The search tree below `state` (numbers sorted descending), reached by the moves `path`.

    A thread that found the target concludes with the whole chain from the root's numbers
    (`path`, then its own chain): its parent's conclusion, the root's answer included, is
    then a copy of the line right above it (the root rewriting the move itself, from its
    outline list, miscopied it), and the join verifier checks a child's chain against the
    problem as a whole."""
    if len(state) == 2:
        return _leaf(state, target)
    options = moves(state, ROOT_PAIRS if len(state) == 4 else None)[:cap]
    children = [search(rest, target, path=(*path, move)) for move, rest in options]
    node = Node([m for m, _ in options], [rest for _, rest in options], target, children, "", None)
    if node.winner is not None:
        node.found = f"{node.moves[node.winner]},{children[node.winner].found}"
    chain = ",".join([*map(str, path), node.found]) if node.found else None
    if len(state) == 4:
        node.tail = f"{chain}\n" if chain else "none\n"
    else:
        node.tail = f"{chain} found\n</Thread>" if chain else "none\n</Thread>"
    return node


def solution_kind(problem: Problem) -> str:
    """Which operators the search's own solution needs: "/" (a division), "*" (a product and
    no division), "+-" (neither), or "none" (the search cannot solve the problem)."""
    found = search(tuple(sorted(problem.nums, reverse=True)), problem.target).found
    if found is None:
        return "none"
    return next((op for op in "/*" if op in found), "+-")


def _leaf(state: tuple[int, ...], target: int) -> Node:
    """Each try writes its result next to the target (`66-17=49:49 found`): the model compares
    two numbers side by side (comparing with the header's target, a line or more back,
    it never learned: P(found) was the same for hits and misses)."""
    a, b = state
    lines, found = [], None
    for op in "+-*/":
        r = apply(a, op, b)
        if r is None:
            continue
        eq = f"{a}{op}{b}={r}"
        lines.append(f"{eq}:{target} found\n" if r == target else f"{eq}:{target}\n")
        if r == target:
            found = eq
            break
    lines.append("" if found else "none\n")
    return Node([], [], target, [], "".join(lines) + "</Thread>", found)


def parallel(
    problem: Problem, threads: int | None = None, keep: int = 0, rng: random.Random | None = None
) -> list[Segment]:
    """The parallel search as a tree of segments, root first; the root's last segment is its answer.

    `keep` > 0 packs, of each fork's children, only the one that found the target and
    random others up to `keep` (a training sample of the search: a search has ~40 leaves,
    alike); every kept thread still sees exactly its full context, joins included."""
    root = search(tuple(sorted(problem.nums, reverse=True)), problem.target, threads)
    segments = [Segment(prompt(problem, threads), False, None, 0)]
    _pack(root, segments, keep, rng or random.Random(0))
    return segments


def _pack(node: Node, out: list[Segment], keep: int, rng: random.Random) -> None:
    """Append `node`'s thread (its parent chain ends at out[-1]) and, depth first, its children's."""
    thread = out[-1].thread
    if not node.children:  # a leaf: its tries, all its own
        out.append(Segment(node.tail, True, len(out) - 1, thread))
        return
    out.append(Segment(node.fork_text(), True, len(out) - 1, thread))
    fork = len(out) - 1
    packed = range(len(node.children))
    if keep:
        winner = [] if node.winner is None else [node.winner]
        others = [i for i in packed if i != node.winner]
        packed = sorted(winner + rng.sample(others, min(len(others), keep - len(winner))))
    for i in packed:
        out.append(Segment(node.header(i), False, fork, 1 + max(s.thread for s in out)))
        _pack(node.children[i], out, keep, rng)
    out.append(Segment(node.join_text(), False, fork, thread))
    out.append(Segment(node.tail, True, len(out) - 1, thread))


def thread_text(segments: list[Segment], thread: int) -> str:
    """One thread's own stream (its header, fork, join and conclusion), without its context."""
    return "".join(s.text for s in segments if s.thread == thread and s.parent is not None)


def sequential(problem: Problem, threads: int | None = None) -> list[Segment]:
    """The same search in one thread, with the tags turned into plain characters."""
    root = search(tuple(sorted(problem.nums, reverse=True)), problem.target, threads)
    text = root.serial_text()
    for tag, mark in SEQUENTIAL_MARKS.items():
        text = text.replace(tag, mark)
    return [Segment(prompt(problem, threads), False, None, 0), Segment(text, True, 0, 0)]


def sample_threads(rng: random.Random) -> int | None:
    """A root fan-out cap for a training prompt: none most of the time."""
    return rng.randint(1, 4) if rng.random() < 0.3 else None  # the root forks 4 ways most often
