"""The batch entrypoint for `ray job submit`: JSONL requests in, JSONL results out.

    ray job submit --working-dir . -- python -m cluster.job --input requests.jsonl --output results.jsonl

Each input line is `{"prompt": "...", ...Braid options}` (protocol, max_threads,
max_depth, max_total_tokens, child_max_tokens, join_policy, sampling) or, for the
Countdown task, `{"nums": [4 ints], "target": int}`. Requests run through the cluster's
coordinator with bounded concurrency and a progress bar; each result is written (and
flushed) as it finishes, with its input line number. A request the cluster refuses for now
(busy, or a latency budget it cannot meet now) is sent again after the time the refusal
names, up to `--retries` times. A line that cannot be read, or that failed, gets an error
record and the job goes on. A summary ends the run. Rerun with the same output file to
resume: lines already answered are skipped, and failed ones run again (their error records
replaced), so each line ends with one record, none lost or duplicated.

On a cluster where Braid already runs, the job uses it; `--replicas` and `--model`, when
given, must match it (else a clear error), since a running cluster is not restarted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from actors.outcomes import Refused, cause
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
    """Input line numbers already answered in `output`; the file keeps only those records
    (a failed line's error record, or a record cut off by a kill, goes: that line runs again)."""
    if not output.exists():
        return set()
    done, keep = set(), []
    for raw in output.read_text().splitlines():
        try:
            row = json.loads(raw)
            if "error" not in row:
                done.add(row["line"])
                keep.append(raw)
        except (ValueError, KeyError, TypeError):
            continue
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


@dataclass(slots=True)
class Pending:
    """A request read from its line, not yet answered."""

    line: int
    id: Any
    prompt: str
    options: dict[str, Any]
    refusals: int = 0
    due: float = 0.0  # time.monotonic() from which it may be sent (again)


def run(
    inputs: Path, output: Path, coordinator: Any, concurrency: int, progress: bool = True, retries: int = 20
) -> dict:
    lines = inputs.read_text().splitlines()
    skip = done_lines(output)
    todo = [(n, line) for n, line in enumerate(lines, 1) if line.strip() and n not in skip]
    latencies: list[float] = []
    errors = refusals = 0
    refused: list[Pending] = []  # to be sent again once due
    in_flight: dict[Any, Pending] = {}
    bar = tqdm(total=len(todo), desc="braid job", disable=not progress, file=sys.stderr)
    with output.open("a") as out:

        def write(row: dict) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update(1)

        def next_request() -> Pending | None:
            """A refused request now due, else the next line's (a bad line is written off here)."""
            nonlocal errors
            due = [r for r in refused if r.due <= time.monotonic()]
            if due:
                refused.remove(due[0])
                return due[0]
            while todo:
                line_no, line = todo.pop(0)
                request_id = None
                try:
                    request_id = json.loads(line).get("id")
                    return Pending(line_no, request_id, *parse_request(line))
                except (ValueError, TypeError, AttributeError) as err:
                    errors += 1
                    write({"line": line_no, "id": request_id, "error": f"bad request: {err}"})
            return None

        while todo or in_flight or refused:
            while len(in_flight) < concurrency and (request := next_request()) is not None:
                in_flight[coordinator.generate.remote(request.prompt, request.options)] = request
            if not in_flight:
                time.sleep(max(0.0, min(r.due for r in refused) - time.monotonic()) if refused else 0.0)
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)  # wakes for refused ones due
            if not ready:
                continue
            request = in_flight.pop(ready[0])
            try:
                result = record(request.line, request.id, ray.get(ready[0]))
                latencies.append(result["latency_s"])
            except (ray.exceptions.RayError, ValueError) as err:
                why = cause(err, Refused)
                if why is not None and request.refusals < retries:
                    refusals += 1
                    request.refusals += 1
                    request.due = time.monotonic() + why.retry_after_s
                    refused.append(request)
                    continue
                errors += 1
                result = {"line": request.line, "id": request.id, "error": root_cause(err)}
            write(result)
    bar.close()
    return {
        "lines": len(lines),
        "skipped_as_done": len(skip),
        "answered": len(latencies),
        "errors": errors,
        "refusals_retried": refusals,
        "p50_latency_s": statistics.median(latencies) if latencies else None,
        "max_latency_s": max(latencies) if latencies else None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--retries", type=int, default=20, help="times a refused request (429/503) is sent again")
    parser.add_argument("--replicas", type=int, default=None,
                        help="replicas to start if Braid is not running (default 1); else must match it")  # fmt: skip
    parser.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica it starts (1 on GPU nodes)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica it starts")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded Countdown model); "
                        "if Braid is running, must match it")  # fmt: skip
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="weights and KV of the replicas it starts (default: the checkpoint's)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    ray.init(ignore_reinit_error=True)  # under `ray job submit`: the job's cluster; else a local one
    asked = {"num_replicas": args.replicas, "model_path": args.model and str(Path(args.model).resolve())}
    asked = {k: v for k, v in asked.items() if v is not None}
    config = ClusterConfig(replica_gpus=args.replica_gpus, replica_cpus=args.replica_cpus, dtype=args.dtype, **asked)
    try:
        coordinator = connect_or_start(config, must_match=tuple(asked))
    except ValueError as error:
        sys.exit(f"braid job: {error}")
    summary = run(args.input, args.output, coordinator, args.concurrency, retries=args.retries)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
