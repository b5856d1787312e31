"""`braid demo`: a minute with Braid. A local Ray cluster (two replicas of the embedded
Countdown model), a few problems solved one after another, each request's thread tree
drawn live in the terminal as the model forks and joins, its final answer checked
exactly, a timeline of it written (PNG and HTML), then a summary.

    braid demo [--problems 6] [--replicas 2] [--out /tmp/braid/demo]

The problems: first some the shipped model is known to solve (`KNOWN`), then test-split
problems it has not been picked for — it solves about a third of those (see the README), and
the demo shows its misses as they are.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.tree import Tree

from cluster.config import ClusterConfig, init_ray, start
from cluster.timeline import render_html, render_png
from countdown import problems
from countdown.problems import Problem
from countdown.traces import SERVE_OPTIONS
from countdown.traces import prompt as countdown_prompt
from countdown.verify import check_answer, final_answer

KNOWN = [Problem((21, 90, 42, 70), 83), Problem((57, 63, 24, 8), 12)]  # solved by the shipped model
STYLE = {"running": "yellow", "joined": "green", "done": "green", "truncated": "dark_orange", "pruned": "grey50",
         "rejected": "red", "failed": "red", "cancelled": "grey50"}  # fmt: skip


class LiveTree:
    """A request's thread tree, built from its stream's thread events."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.nodes: dict[int, dict[str, Any]] = {}
        self.root_text = ""

    def apply(self, event: dict) -> None:
        if event["type"] == "text":
            self.root_text += event["text"]
        elif event["type"] == "thread":
            node = self.nodes.setdefault(event["thread_id"], {"parent": event["parent_id"], "spawn": event["spawn"]})
            node["status"] = "running" if event["event"] == "forked" else event["event"]

    def render(self, threads: list[dict] | None = None) -> Tree:
        """The tree so far (threads in the order they forked); with the final `threads`, each
        thread's tokens and where it ran too."""
        tree = Tree(f"[bold]{self.title}[/]")
        if threads:
            final = {t["thread_id"]: t for t in threads}
            root = next(t for t in threads if t["parent_id"] is None)

            def add(branch: Tree, node: dict) -> None:
                where = f"replica {node['replica']}" if node.get("replica") is not None else "here"
                sub = branch.add(f"{self.label(node['thread_id'], node['spawn'], node['status'])}  "
                                 f"{node['generated_tokens']} tok, {where}")  # fmt: skip
                for child in node["children"]:
                    add(sub, final[child])

            top = tree.add(f"root  {root['generated_tokens']} tok")
            for child in root["children"]:
                add(top, final[child])
            return tree
        branches: dict[int | None, Tree] = {None: tree.add("root")}
        for tid, node in self.nodes.items():  # parents fork before their children
            parent = branches.get(node["parent"], branches[None])
            branches[tid] = parent.add(self.label(tid, node["spawn"], node["status"]))
        return tree

    @staticmethod
    def label(thread_id: int, spawn: str, status: str) -> str:
        return f"[{STYLE.get(status, 'white')}]t{thread_id} {spawn[:28]} — {status}[/]"


def solve(coordinator: Any, problem: Problem, console: Console, out: Path, index: int) -> dict:
    prompt = countdown_prompt(problem)
    live_tree = LiveTree(f"{' '.join(map(str, problem.nums))} -> {problem.target}")
    result: dict | None = None
    with Live(live_tree.render(), console=console, refresh_per_second=12, transient=True) as live:
        for ref in coordinator.stream.remote(prompt, dict(SERVE_OPTIONS)):
            event = ray.get(ref)
            if event["type"] == "result":
                result = event["result"]
            elif event["type"] == "error":
                raise RuntimeError(event["error"])
            else:
                live_tree.apply(event)
                live.update(live_tree.render())
    assert result is not None
    answer = final_answer(result["text"])
    correct = check_answer(problem, answer)
    console.print(live_tree.render(result["threads"]))
    mark = "[green]✓ correct[/]" if correct else "[red]✗ not solved[/]"
    cache = result["cache"]
    shared = cache.get("shared_blocks", 0) / max(cache.get("used_blocks", 0), 1)
    console.print(f"  answer: {answer or '(none)'}  {mark}  {result['latency_s']:.2f} s, "
                  f"{len(result['threads'])} threads, KV shared {shared:.0%} of blocks at the peak")  # fmt: skip
    render_png(result, out / f"request-{index}.png")
    render_html(result, out / f"request-{index}.html")
    return {"correct": correct, "latency_s": result["latency_s"], "threads": len(result["threads"]), "shared": shared}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=6)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=4, help="live threads per replica before forks spill over")
    parser.add_argument("--out", type=Path, default=Path("/tmp/braid/demo"), help="where the timelines go")
    parser.add_argument("--address", default=None, help="a running Ray cluster to use (auto: the one on this "
                        "machine); default: start a local one")  # fmt: skip
    args = parser.parse_args(argv)
    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    unseen = [p for p in problems.splits(0, 0, args.problems + len(KNOWN))["test"] if p not in KNOWN]
    chosen = (KNOWN + unseen)[: args.problems]
    where = init_ray(args.address, num_cpus=max(2, args.replicas), include_dashboard=False, log_to_driver=False)
    console.print(f"On {where}: {args.replicas} replicas of the embedded Countdown model ...")
    try:
        coordinator = start(ClusterConfig(num_replicas=args.replicas, capacity=args.capacity))
        console.print(f"{len(chosen)} problems: the first {min(len(KNOWN), len(chosen))} known to be solved, "
                      "the rest from the test split.\n")  # fmt: skip
        started = time.perf_counter()
        rows = [solve(coordinator, p, console, args.out, i) for i, p in enumerate(chosen)]
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    table = Table(title="Summary")
    for column in ("problems", "solved", "median latency", "threads / request", "KV shared at peak", "wall"):
        table.add_column(column)
    median_s = statistics.median(r["latency_s"] for r in rows)
    table.add_row(
        str(len(rows)), str(sum(r["correct"] for r in rows)), f"{median_s:.2f} s",
        f"{statistics.mean(r['threads'] for r in rows):.1f}", f"{statistics.mean(r['shared'] for r in rows):.0%}",
        f"{wall:.1f} s",
    )  # fmt: skip
    console.print(table)
    console.print(f"Timelines: {args.out}/request-*.png and .html (braid trace renders any answer the same way).")


if __name__ == "__main__":
    main()
