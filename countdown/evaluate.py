"""Evaluate a Countdown checkpoint through Braid's engine, exactly as served.

    python -m countdown.evaluate                      # the shipped parallel model, test split
    python -m countdown.evaluate --model countdown/model-sequential
    python -m countdown.evaluate --problems my.jsonl --no-verifier

The parallel model runs with the ThreadWeaver protocol, the `first_success` join policy
and the exact-arithmetic verifier at every join (`--no-verifier` turns it off, to see the
model alone). A sequential model runs as one thread. Every final answer is checked
exactly: arithmetic re-done, each input used once, the target reached. Prints a progress
bar, a summary, the accuracy by the operators the search's solution needs (+-, *, /, or
none: the search cannot solve it), and last a line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from countdown import problems as countdown_problems
from countdown.traces import SERVE_OPTIONS, prompt, solution_kind
from countdown.verify import check_answer, claims_found, final_answer, verify_claim
from engine.engine import Engine
from engine.forkjoin import ForkJoinEngine
from engine.sampling import SamplingParams
from engine.threads import ForkJoinOptions, ForkJoinResult

DEFAULT_MODEL = Path(__file__).parent / "model"


@dataclass(slots=True, frozen=True)
class Outcome:
    problem: countdown_problems.Problem
    correct: bool
    latency_s: float
    result: ForkJoinResult

    @property
    def root_fanout(self) -> int:
        root = self.result.threads[0]
        return sum(1 for node in self.result.threads if node.parent_id == root.thread_id and node.fork == 0)


def model_format(path: Path) -> str:
    info = path / "training.json"
    return json.loads(info.read_text()).get("format", "parallel") if info.exists() else "parallel"


def options_for(fmt: str, max_threads: int) -> ForkJoinOptions:
    if fmt == "sequential":  # the trained context is 2048 tokens, the prompt ~15 of them
        return ForkJoinOptions(protocol="threadweaver", sampling=SamplingParams(max_new_tokens=2000))
    return ForkJoinOptions(  # the search: a root forking up to 8 ways, children up to 12
        **SERVE_OPTIONS,
        max_depth=2,
        max_fanout=12,
        max_threads=max_threads,
        child_max_tokens=400,
        max_total_tokens=8000,
        sampling=SamplingParams(max_new_tokens=400),
    )


def evaluate(
    model: Path,
    problems: list[countdown_problems.Problem],
    verifier: bool = True,
    threads_cap: int | None = None,
    concurrency: int = 8,
    max_threads: int = 64,
    engine: Engine | None = None,
    progress: bool = True,
    options: ForkJoinOptions | None = None,
) -> list[Outcome]:
    """Run every problem through Braid (`concurrency` requests in flight); outcomes in order."""
    engine = engine or Engine(model, kv_cache_bytes=256 * 2**20)
    fj = ForkJoinEngine(engine, verifier=verify_claim if verifier else None, succeeded=claims_found)
    options = options or options_for(model_format(model), max_threads)
    outcomes: dict[int, Outcome] = {}
    pending = list(enumerate(problems))
    in_flight: dict[int, tuple[int, float]] = {}  # request id -> (problem index, start)
    bar = tqdm(total=len(problems), desc=f"eval {model.name}", disable=not progress)
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            index, problem = pending.pop(0)
            in_flight[fj.submit(prompt(problem, threads_cap), options)] = (index, time.perf_counter())
        for result in fj.step():
            index, start = in_flight.pop(result.request_id)
            problem = problems[index]
            correct = check_answer(problem, final_answer(result.text))
            outcomes[index] = Outcome(problem, correct, time.perf_counter() - start, result)
            bar.update(1)
            bar.set_postfix(accuracy=f"{sum(o.correct for o in outcomes.values()) / len(outcomes):.3f}")
    bar.close()
    return [outcomes[i] for i in range(len(problems))]


def summary(outcomes: list[Outcome]) -> dict:
    n = len(outcomes)
    return {
        "accuracy": sum(o.correct for o in outcomes) / n,
        "n": n,
        "median_latency_s": statistics.median(o.latency_s for o in outcomes),
        "mean_threads": statistics.mean(len(o.result.threads) for o in outcomes),
        "mean_tokens": statistics.mean(o.result.usage.generated_tokens for o in outcomes),
        "mean_critical_path_tokens": statistics.mean(o.result.usage.critical_path_tokens for o in outcomes),
        "root_fanout": dict(sorted(Counter(o.root_fanout for o in outcomes).items())),
        "by_solution": by_solution(outcomes),
    }


def by_solution(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    """Accuracy by the operators the traces' search needs for each problem (`solution_kind`):
    where a model that follows the search is let down by its arithmetic (divisions, products)."""
    total: Counter[str] = Counter()
    solved: Counter[str] = Counter()
    for o in outcomes:
        kind = solution_kind(o.problem)
        total[kind] += 1
        solved[kind] += o.correct
    kinds = ("+-", "*", "/", "none")
    return {kind: {"n": total[kind], "accuracy": solved[kind] / total[kind]} for kind in kinds if total[kind]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder")
    parser.add_argument("--problems", type=Path, help='JSONL of {"nums": [4 ints], "target": int}; default: test split')
    parser.add_argument("--limit", type=int, default=1000, help="evaluate the first N problems")
    parser.add_argument("--no-verifier", action="store_true", help="join children without checking their claims")
    parser.add_argument("--threads-cap", type=int, help="prompt prefix T<n>: the model forks at most n at its root")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(
            f"{args.model} is not a checkpoint folder (no config.json); train one: python -m countdown.train"
        )
    problems = (
        countdown_problems.load_jsonl(args.problems) if args.problems else countdown_problems.splits(0, 0, 1000)["test"]
    )
    problems = problems[: args.limit]
    outcomes = evaluate(args.model, problems, not args.no_verifier, args.threads_cap, args.concurrency)
    result = summary(outcomes)
    result.update(
        model=str(args.model),
        format=model_format(args.model),
        verifier=not args.no_verifier,
        threads_cap=args.threads_cap,
        concurrency=args.concurrency,
    )
    print(
        f"{result['format']} model {args.model}: {result['accuracy']:.1%} of {result['n']} solved, "
        f"median latency {result['median_latency_s']:.2f} s, {result['mean_threads']:.1f} threads, "
        f"{result['mean_tokens']:.0f} tokens ({result['mean_critical_path_tokens']:.0f} on the critical path)"
    )
    parts = (f"{kind} {row['accuracy']:.0%} of {row['n']}" for kind, row in result["by_solution"].items())
    print(f"by the operators the search's solution needs: {', '.join(parts)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
