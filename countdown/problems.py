"""Countdown problems: reach a target from 4 numbers with + - * /, each number used once.

As in the APR paper: inputs in 1..99, target in 10..100, every problem solvable (checked
by an exhaustive solver). Intermediate results must be positive integers (division only
when exact) and, to keep numbers short for a small model, below `MAX_VALUE`; a problem
counts as solvable only with such steps.

`python -m countdown.problems --held-out 200 --out FILE` draws problems as the APR paper
does (solvable with positive-integer steps of any size), a set none of Braid's splits
was drawn from: what `braid eval countdown --problems FILE` measures generalisation on.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MAX_VALUE = 1000
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
TRAIN_PROBLEMS = 40_000  # what the shipped models were trained on (the first 20,000 before phase 7)


@dataclass(frozen=True, slots=True)
class Move:
    a: int
    op: str
    b: int
    result: int

    def __str__(self) -> str:
        return f"{self.a}{self.op}{self.b}={self.result}"


@dataclass(frozen=True, slots=True)
class Problem:
    nums: tuple[int, ...]
    target: int

    def to_json(self) -> str:
        return json.dumps({"nums": list(self.nums), "target": self.target})


def apply(a: int, op: str, b: int, max_value: int | None = MAX_VALUE) -> int | None:
    """The result of `a op b`, or None when it is not a positive integer below `max_value`
    (None: of any size, the APR paper's rule)."""
    if op == "+":
        r = a + b
    elif op == "-":
        r = a - b
    elif op == "*":
        r = a * b
    elif op == "/":
        r = a // b if b and a % b == 0 else 0
    else:
        raise ValueError(f"unknown operator {op!r}")
    return r if r > 0 and (max_value is None or r < max_value) else None


def moves(
    nums: tuple[int, ...], pairs: int | None = None, max_value: int | None = MAX_VALUE
) -> list[tuple[Move, tuple[int, ...]]]:
    """Every legal move from a state: (the move, the numbers left after it), larger operand
    first, pair by pair in index order ((0, 1), (0, 2), ..., then + - * /); `pairs` keeps
    only the moves of the first so many pairs."""
    out = []
    index_pairs = [(i, j) for i in range(len(nums)) for j in range(i + 1, len(nums))]
    for i, j in index_pairs[:pairs]:
        a, b = max(nums[i], nums[j]), min(nums[i], nums[j])
        rest = tuple(n for k, n in enumerate(nums) if k not in (i, j))
        for op in "+-*/":
            r = apply(a, op, b, max_value)
            if r is not None:
                out.append((Move(a, op, b, r), tuple(sorted((*rest, r), reverse=True))))
    return out


@lru_cache(maxsize=500_000)
def solve(nums: tuple[int, ...], target: int, max_value: int | None = MAX_VALUE) -> tuple[Move, ...] | None:
    """A shortest list of moves that leaves exactly `target`, or None. `nums` sorted descending."""
    if len(nums) == 1:
        return () if nums[0] == target else None
    for move, rest in moves(nums, max_value=max_value):
        tail = solve(rest, target, max_value)
        if tail is not None:
            return (move, *tail)
    return None


def generate(count: int, seed: int, exclude: set[Problem] | None = None) -> list[Problem]:
    """`count` distinct solvable problems, none of them in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    problems: list[Problem] = []
    while len(problems) < count:
        nums = tuple(rng.randint(1, 99) for _ in range(4))
        problem = Problem(nums, rng.randint(10, 100))
        if problem in seen:
            continue
        seen.add(problem)
        if solve(tuple(sorted(nums, reverse=True)), problem.target) is not None:
            problems.append(problem)
    return problems


def splits(train: int, validation: int, test: int) -> dict[str, list[Problem]]:
    """Train / validation / test with their own seeds and no problem in two of them."""
    out: dict[str, list[Problem]] = {}
    taken: set[Problem] = set()
    for name, count in (("test", test), ("validation", validation), ("train", train)):
        out[name] = generate(count, SPLIT_SEEDS[name], taken)
        taken.update(out[name])
    return out


def load_jsonl(path: str | Path) -> list[Problem]:
    """Problems from `{"nums": [4 ints], "target": int}` lines."""
    problems = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            nums, target = [int(n) for n in row["nums"]], int(row["target"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: expected {{'nums': [4 ints], 'target': int}}: {err}") from err
        if len(nums) != 4:
            raise ValueError(f"{path}:{number}: expected 4 numbers, got {len(nums)}")
        problems.append(Problem(tuple(nums), target))
    return problems


def solvable_any_size(nums: tuple[int, ...], target: int) -> bool:
    """Whether `target` is reachable with positive-integer steps of any size (the APR paper's rules)."""
    return solve(tuple(sorted(nums, reverse=True)), target, max_value=None) is not None


def held_out(count: int, seed: int, exclude: set[Problem]) -> list[Problem]:
    """`count` distinct problems drawn as the APR paper draws them, none of `exclude` (in any order)."""
    rng = random.Random(seed)
    seen = {_key(p) for p in exclude}
    out: list[Problem] = []
    while len(out) < count:
        problem = Problem(tuple(rng.randint(1, 99) for _ in range(4)), rng.randint(10, 100))
        if _key(problem) not in seen and solvable_any_size(problem.nums, problem.target):
            seen.add(_key(problem))
            out.append(problem)
    return out


def _key(problem: Problem) -> tuple[tuple[int, ...], int]:
    """A problem as the model sees it: the numbers in any order."""
    return tuple(sorted(problem.nums)), problem.target


def main() -> None:
    parser = argparse.ArgumentParser(description="Draw a held-out Countdown set (APR paper's distribution) as JSONL.")
    parser.add_argument("--held-out", type=int, default=200, metavar="N", help="how many problems")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print("leaving out Braid's train, validation and test problems (a few minutes to list them)", flush=True)
    chosen = held_out(
        args.held_out, args.seed, {p for group in splits(TRAIN_PROBLEMS, 1000, 1000).values() for p in group}
    )
    args.out.write_text("".join(p.to_json() + "\n" for p in chosen))
    ours = sum(solve(tuple(sorted(p.nums, reverse=True)), p.target) is not None for p in chosen)
    print(
        f"{len(chosen)} problems in {args.out}; {ours} of them solvable under Braid's rules (steps below {MAX_VALUE})"
    )


if __name__ == "__main__":
    main()
