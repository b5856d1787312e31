"""Braid's HTTP service: its overhead against calling the coordinator directly, and SLA
attainment under a steady load of concurrent forking requests.

    python -m bench.serve

A local Ray cluster with the embedded model (one replica) and the Serve app, in one run:
1. HTTP overhead: short completions (`max_tokens` 8, no fork) one at a time, over HTTP
   (`requests`, a kept-alive session) and straight to the Coordinator actor; p50 and p99
   of each. Peer: the direct coordinator call.
2. SLA attainment: each forking Countdown request (room for its whole search, so that it
   ends on its own) has its unloaded latency measured alone;
   then `--requests` of them run `--concurrency` at a time, each with `max_latency_s` =
   2x its own unloaded latency; attainment = admitted requests that answered on their own
   within their budget / admitted requests (one cut short at its deadline is a miss). A
   request refused (503 at once) is sent again after its Retry-After, as a client with
   backoff would; those refusals are counted apart.
Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import ray
import requests

from bench.load import WHOLE_SEARCH, LocalService, countdown_bodies, drive, missed, percentile
from countdown.traces import SERVE_OPTIONS

RETRIES = 100  # a refused request (503) is sent again after its Retry-After, up to this many times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=60, help="short requests per path for the overhead")
    parser.add_argument("--requests", type=int, default=24, help="forking requests under load")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()

    with LocalService() as service:
        url = f"{service.url}/v1/completions"
        session = requests.Session()
        session.headers.update(service.auth)  # the HTTP path checks an API key, as a real deployment does
        short = {"prompt": "44 12 8 3>43\n", "max_tokens": 8}
        options = {**SERVE_OPTIONS, "max_total_tokens": 8, "sampling": {"max_new_tokens": 8}}

        def over_http() -> float:
            start = time.perf_counter()
            session.post(url, json=short, timeout=60).raise_for_status()
            return time.perf_counter() - start

        def direct() -> float:
            start = time.perf_counter()
            ray.get(service.coordinator.generate.remote(short["prompt"], options))
            return time.perf_counter() - start

        for _ in range(5):  # warm-up both paths
            over_http(), direct()
        http_s, direct_s = [], []
        for _ in range(args.short):  # interleaved, so both see the same machine
            http_s.append(over_http())
            direct_s.append(direct())

        bodies = countdown_bodies(args.requests, None, max_tokens=WHOLE_SEARCH)
        unloaded = [o.body["braid"]["latency_s"] for o in drive(service, bodies, 1)]
        budgeted = [{**body, "max_latency_s": 2 * alone} for body, alone in zip(bodies, unloaded, strict=True)]
        done = drive(service, budgeted, args.concurrency, retries=RETRIES)
        outcomes = [(o.status, o.body) for o in done]

    admitted = [body for status, body in outcomes if status == 200]
    met = sum(1 for body in admitted if body["braid"]["sla"]["met"])
    attainment = met / len(admitted) if admitted else 0.0
    p50_http, p50_direct = statistics.median(http_s), statistics.median(direct_s)
    print(f"\nHTTP overhead, {args.short} short completions each (8 tokens), ms")
    print(f"{'path':>12} {'p50':>8} {'p99':>8}")
    print(f"{'HTTP':>12} {1000 * p50_http:>8.1f} {1000 * percentile(http_s, 0.99):>8.1f}")
    print(f"{'coordinator':>12} {1000 * p50_direct:>8.1f} {1000 * percentile(direct_s, 0.99):>8.1f}")
    print(f"\nSLA: {len(bodies)} forking requests, {args.concurrency} at a time, budget 2x unloaded latency "
          f"(median unloaded {statistics.median(unloaded):.2f} s)")  # fmt: skip
    refused = len(outcomes) - len(admitted)
    refusals = sum(o.refusals for o in done)
    cut = sum(1 for b in admitted if b["braid"]["sla"]["outcome"] == "truncated")
    print(f"  admitted {len(admitted)}, refused in the end {refused}, met {met}: attainment {attainment:.3f}; "
          f"{cut} cut short (misses); {refusals} refusals (503) retried")  # fmt: skip
    over = [ratio for ratio, _ in missed([b["braid"] for b in admitted])]
    if over:
        print(f"  missed by: median {statistics.median(over):.2f}x, max {max(over):.2f}x of the budget")
    print(json.dumps({"bench": "serve", "sla_attainment": round(attainment, 3),
                      "http_overhead_p50_ms": round(1000 * (p50_http - p50_direct), 2), "cut_at_deadline": cut,
                      "refused": refused, "refusals_retried": refusals,
                      "http_p99_ms": round(1000 * percentile(http_s, 0.99), 2),
                      "direct_p99_ms": round(1000 * percentile(direct_s, 0.99), 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
