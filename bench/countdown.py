"""Accuracy against latency: the parallel Countdown model vs the sequential baseline.

Both shipped checkpoints were trained with the same budget (steps x tokens per step, one
CPU core each). Each runs through Braid's engine on the same test problems, a few
requests in flight; the parallel model at several root fan-out caps (`T<n>` prompt
prefix), the sequential one at several token budgets. Every answer is checked exactly.

The comparison is the one a user with a latency budget meets: for each latency the
sequential model is measured at, the parallel model at the fan-out the coordinator would
choose with that budget — the widest of the task's widths (`countdown.serving.TASK`)
measured to answer within it — and whether it is at least as accurate.
Prints a table, saves `docs/countdown_accuracy_latency.png`, and ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from countdown import problems as countdown_problems
from countdown.evaluate import evaluate, options_for, summary
from countdown.serving import TASK
from engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PARALLEL, SEQUENTIAL = ROOT / "countdown" / "model", ROOT / "countdown" / "model-sequential"
CAPS = sorted({1, 2, 4, None, *TASK.widths}, key=lambda c: c or 99)  # the task's widths among them


def run(args: argparse.Namespace) -> list[dict]:
    problems = countdown_problems.splits(0, 0, 1000)["test"][: args.problems]
    rows = []
    for cap in CAPS:
        s = summary(evaluate(PARALLEL, problems, threads_cap=cap, concurrency=args.concurrency, progress=False))
        rows.append({"model": "parallel", "setting": setting(cap), **s})
        print_row(rows[-1])
    for budget in (300, 600, 1000, 1500, 2000):
        options = options_for("sequential", 1)
        options = type(options)(protocol=options.protocol, sampling=SamplingParams(max_new_tokens=budget))
        s = summary(evaluate(SEQUENTIAL, problems, concurrency=args.concurrency, progress=False, options=options))
        rows.append({"model": "sequential", "setting": f"{budget} tokens", **s})
        print_row(rows[-1])
    return rows


def at_sequential_latencies(rows: list[dict]) -> list[dict]:
    """For each sequential row: the parallel setting the coordinator would choose with that
    latency as the budget (the widest of the task's widths whose median latency is within
    it; none: the request would be refused) and whether it is at least as accurate."""
    par = {r["setting"]: r for r in rows if r["model"] == "parallel"}
    out = []
    for seq in (r for r in rows if r["model"] == "sequential"):
        fits = [par[setting(w)] for w in TASK.widths if par[setting(w)]["median_latency_s"] <= seq["median_latency_s"]]
        chosen = fits[0] if fits else None
        accuracy = chosen["accuracy"] if chosen else 0.0
        out.append({"latency_s": seq["median_latency_s"], "sequential": seq["accuracy"],
                    "parallel_setting": chosen["setting"] if chosen else "refused", "parallel": accuracy,
                    "parallel_at_least_as_accurate": accuracy >= seq["accuracy"]})  # fmt: skip
    return out


def setting(cap: int | None) -> str:
    return f"T{cap}" if cap else "no cap"


def print_row(r: dict) -> None:
    print(
        f"{r['model']:<11} {r['setting']:<11} {r['accuracy']:>8.1%} {r['median_latency_s']:>9.2f} "
        f"{r['mean_tokens']:>8.0f} {r['mean_critical_path_tokens']:>8.0f} {r['mean_threads']:>8.1f}",
        flush=True,
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, marker in (("parallel", "o-"), ("sequential", "s--")):
        pts = sorted((r["median_latency_s"], r["accuracy"], r["setting"]) for r in rows if r["model"] == model)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker, label=model)
        for x, y, label in pts:
            ax.annotate(label, (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="median latency per problem (s)", ylabel="solved (%)", title="Countdown on a 2-core CPU, Braid")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    print(f"{'model':<11} {'setting':<11} {'solved':>8} {'median s':>9} {'tokens':>8} {'crit.':>8} {'threads':>8}")
    rows = run(args)
    plot(rows, ROOT / "docs" / "countdown_accuracy_latency.png")
    compared = at_sequential_latencies(rows)
    print(f"\n{'latency s':>9} {'sequential':>10} {'parallel':>9}  (the coordinator's fan-out for that budget)")
    for c in compared:
        print(f"{c['latency_s']:>9.2f} {c['sequential']:>10.1%} {c['parallel']:>9.1%}  {c['parallel_setting']}")
    print(
        json.dumps(
            {
                "bench": "countdown",
                "problems": args.problems,
                "parallel_ahead_at_every_latency": all(c["parallel_at_least_as_accurate"] for c in compared),
                "parallel_best_accuracy": max(r["accuracy"] for r in rows if r["model"] == "parallel"),
                "sequential_best_accuracy": max(r["accuracy"] for r in rows if r["model"] == "sequential"),
                "at_sequential_latencies": compared,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
