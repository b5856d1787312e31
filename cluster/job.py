"""The batch entrypoint for `ray job submit`: JSONL requests in, JSONL results out.

    ray job submit --working-dir . -- python -m cluster.job --input requests.jsonl --output results.jsonl

Each input line is `{"prompt": "...", ...Braid options}` (protocol, max_threads,
max_depth, max_total_tokens, child_max_tokens, join_policy, sampling) or, for the
Countdown task, `{"nums": [4 ints], "target": int}`. Requests run through the cluster's
coordinator with bounded concurrency and a progress bar; each result is written (and
flushed) as it finishes, with its input line number. Rerun with the same output file to
resume: lines already answered are skipped, so none is lost or duplicated. A line that
cannot be read gets an error record and the job goes on. A summary ends the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from cluster.config import ClusterConfig, connect_or_start
from countdown.problems import Problem
from countdown.traces import SERVE_OPTIONS
from countdown.traces import prompt as countdown_prompt


def parse_request(line: str) -> tuple[str, dict[str, Any]]:
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError("a request line must be a JSON object")
    if "prompt" in row:
        prompt = row.pop("prompt")
    elif "nums" in row and "target" in row:
        prompt = countdown_prompt(Problem(tuple(int(n) for n in row.pop("nums")), int(row.pop("target"))))
        row = {**SERVE_OPTIONS, **row}
    else:
        raise ValueError('a request needs "prompt" (or "nums" and "target" for Countdown)')
    row.pop("id", None)
    return prompt, row


def done_lines(output: Path) -> set[int]:
    """Input line numbers already answered in `output` (a partial last line is dropped)."""
    if not output.exists():
        return set()
    done, keep = set(), []
    for raw in output.read_text().splitlines():
        try:
            done.add(json.loads(raw)["line"])
            keep.append(raw)
        except (ValueError, KeyError):
            continue  # a line cut off by a kill: that request runs again
    output.write_text("".join(line + "\n" for line in keep))
    return done


def root_cause(err: BaseException) -> str:
    """The message of the error a replica raised, out of Ray's wrapping."""
    while isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause
    return f"{type(err).__name__}: {err}".splitlines()[0]


def record(line_no: int, request_id: Any, result: dict) -> dict:
    threads = result["threads"]
    return {
        "line": line_no,
        "id": request_id,
        "text": result["text"],
        "finish_reason": result["finish_reason"],
        "threads": len(threads),
        "max_depth": max(t["depth"] for t in threads),
        "usage": result["usage"],
        "latency_s": round(result["latency_s"], 4),
        "replica": result["replica"],
    }


def run(inputs: Path, output: Path, coordinator: Any, concurrency: int, progress: bool = True) -> dict:
    lines = inputs.read_text().splitlines()
    skip = done_lines(output)
    todo = [(n, line) for n, line in enumerate(lines, 1) if line.strip() and n not in skip]
    latencies: list[float] = []
    errors = 0
    in_flight: dict[Any, tuple[int, Any]] = {}
    bar = tqdm(total=len(todo), desc="braid job", disable=not progress, file=sys.stderr)
    with output.open("a") as out:

        def write(row: dict) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update(1)

        while todo or in_flight:
            while todo and len(in_flight) < concurrency:
                line_no, line = todo.pop(0)
                request_id = None
                try:
                    request_id = json.loads(line).get("id")
                    prompt, options = parse_request(line)
                except (ValueError, TypeError, AttributeError) as err:
                    errors += 1
                    write({"line": line_no, "id": request_id, "error": f"bad request: {err}"})
                    continue
                in_flight[coordinator.generate.remote(prompt, options)] = (line_no, request_id)
            if not in_flight:
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            line_no, request_id = in_flight.pop(ready[0])
            try:
                result = record(line_no, request_id, ray.get(ready[0]))
                latencies.append(result["latency_s"])
            except (ray.exceptions.RayError, ValueError) as err:
                errors += 1
                result = {"line": line_no, "id": request_id, "error": root_cause(err)}
            write(result)
    bar.close()
    return {
        "lines": len(lines),
        "skipped_as_done": len(skip),
        "answered": len(latencies),
        "errors": errors,
        "p50_latency_s": statistics.median(latencies) if latencies else None,
        "max_latency_s": max(latencies) if latencies else None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=1, help="replicas to start if no cluster is running")
    parser.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica it starts (1 on GPU nodes)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica it starts")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded Countdown model)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray.init(ignore_reinit_error=True)  # under `ray job submit`: the job's cluster; else a local one
    config = ClusterConfig(
        num_replicas=args.replicas, replica_gpus=args.replica_gpus, replica_cpus=args.replica_cpus,
        **({"model_path": args.model} if args.model else {}),
    )  # fmt: skip
    summary = run(args.input, args.output, connect_or_start(config), args.concurrency)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
