"""Samples joined across replicas: accuracy and latency of n=1 against n=4 with a vote and
n=4 with the verifier (`first_success`), on the same Countdown problems, in one run.

    python -m bench.consistency [--problems 40] [--temperature 0.6]

Braid's HTTP app on a local Ray cluster with two replicas of the embedded model and the
task's verifier (`countdown.verify:answer_accepted`). Every request samples at
`--temperature` with its own seed (sample j of a request: seed + j), room for the model's
whole search, no latency budget, one request at a time (latencies are each request's
alone). n=1 is the peer: one sample, no join. n=4 goes through the Join actor
(`actors.join`), which spreads the samples over the replicas; "vote" answers with the most
common final answer, "first_success" with the first sample the verifier accepts, the
others cancelled. Accuracy: answers that solve their problem (the same verifier, applied
to every mode's answer). Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import requests

from bench.load import WHOLE_SEARCH, LocalService, percentile
from countdown import problems
from countdown.traces import prompt
from countdown.verify import answer_accepted

VERIFIER = "countdown.verify:answer_accepted"
MODES = {"n1": (1, "all"), "n4_vote": (4, "vote"), "n4_verified": (4, "first_success")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=40, help="test problems, the first of the project's split")
    parser.add_argument("--temperature", type=float, default=0.6)
    args = parser.parse_args()
    prompts = [prompt(p) for p in problems.splits(0, 0, args.problems)["test"]]
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with LocalService(num_cpus=3, num_replicas=2, verifier=VERIFIER) as service:
        session = requests.Session()
        session.headers.update(service.auth)
        for i, text in enumerate(prompts):
            for mode, (n, join) in MODES.items():
                body = {"prompt": text, "max_tokens": WHOLE_SEARCH, "temperature": args.temperature, "seed": 1000 * i,
                        "n": n, "sample_join": join}  # fmt: skip
                start = time.perf_counter()
                reply = session.post(f"{service.url}/v1/completions", json=body, timeout=600)
                latency = time.perf_counter() - start
                reply.raise_for_status()
                answer = reply.json()
                samples = answer["braid"].get("samples") or [answer["braid"]]
                runs[mode].append({
                    "right": answer_accepted(text, answer["choices"][0]["text"]),
                    "latency_s": latency,
                    "replicas": {s["replica"] for s in samples if s["replica"] is not None},
                    "cancelled": sum(s.get("status") == "cancelled" for s in samples),
                })  # fmt: skip
            done = {m: sum(r["right"] for r in rs) for m, rs in runs.items()}
            print(f"[{i + 1}/{len(prompts)}] right so far: {done}", flush=True)
    print(f"\n{'mode':<14} {'accuracy':>9} {'latency p50':>12} {'p90':>7} {'samples cancelled':>18}")
    report: dict[str, float | int | str] = {"bench": "consistency", "problems": len(prompts)}
    for mode, rows in runs.items():
        accuracy = sum(r["right"] for r in rows) / len(rows)
        latencies = [r["latency_s"] for r in rows]
        p50, p90 = statistics.median(latencies), percentile(latencies, 0.9)
        cancelled = sum(r["cancelled"] for r in rows)
        print(f"{mode:<14} {accuracy:>9.1%} {p50:>11.2f}s {p90:>6.2f}s {cancelled:>18}")
        report[f"accuracy_{mode}"] = accuracy
        report[f"latency_p50_{mode}"] = p50
    used = set().union(*(r["replicas"] for mode in ("n4_vote", "n4_verified") for r in runs[mode]))
    report["replicas_used"] = len(used)
    report["temperature"] = args.temperature
    print(json.dumps(report))


if __name__ == "__main__":
    main()
