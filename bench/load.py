"""A bounded load test of Braid over HTTP: many concurrent forking requests on a local Ray
cluster (loopback only, a fixed number of requests), then every replica's cache checked.

    python -m bench.load [--requests 64] [--concurrency 16] [--replicas 2] [--max-requests 8]

The embedded Countdown model, ThreadWeaver, `first_success`, the verifier, room for the whole
search (`WHOLE_SEARCH` tokens: a request ends on its own, not at its token limit); half of the
requests carry a latency budget (`--budget`, seconds). Peer: the same kind of requests
sent one at a time (a quarter as many), same cluster, same run: the latency a request
has alone. Under load, more than `--max-requests` in flight are refused with 429 at once,
and a budget not predicted to be met with 503 (admission), never queued; the clients
retry either after its `Retry-After`, as clients with backoff do, and the refusals are
counted. Latency is that of the attempt answered.
Afterwards each replica's KV cache must pass `check_integrity()` with no block in use and
no thread running, and its memory is compared with its baseline (taken after a warm-up).
Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import ray
import requests
from ray import serve

from actors.coordinator import get_coordinator
from cache_service.transfer import free_port
from cluster.auth import MAX_IN_FLIGHT_PER_KEY, Access
from cluster.config import ClusterConfig
from cluster.serve import PATIENT_SERVE, BraidAPI
from countdown import problems
from countdown.traces import SERVE_OPTIONS
from countdown.traces import prompt as countdown_prompt


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class LocalService:
    """Braid's HTTP app on a new local Ray cluster, with one API key (`with LocalService(...) as s`)."""

    def __init__(self, num_cpus: int = 2, max_in_flight_per_key: int = MAX_IN_FLIGHT_PER_KEY, **config: Any) -> None:
        self.num_cpus, self.config, self.per_key = num_cpus, config, max_in_flight_per_key
        self.key = secrets.token_urlsafe(32)

    def __enter__(self) -> LocalService:
        port = free_port()
        keys_file = Path(tempfile.mkdtemp()) / "api_keys"
        keys_file.write_text(self.key + "\n")
        os.environ.update(PATIENT_SERVE)
        ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ClusterConfig(**self.config)
        access = Access(keys_file=str(keys_file), max_in_flight_per_key=self.per_key)
        serve.run(BraidAPI.bind(config, SERVE_OPTIONS, access), name="braid")
        self.url = f"http://127.0.0.1:{port}"
        self.auth = {"Authorization": f"Bearer {self.key}"}
        self.coordinator = get_coordinator()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        serve.shutdown()
        ray.shutdown()

    def replicas(self) -> list[Any]:
        n = ray.get(self.coordinator.num_replicas.remote())
        return [ray.get(self.coordinator.replica.remote(i)) for i in range(n)]


@dataclass(slots=True, frozen=True)
class Outcome:
    status: int  # HTTP status of the last attempt; 0: no answer within the client's timeout
    latency_s: float  # of the last attempt
    body: dict
    refusals: int = 0  # 429s and 503s answered before it, each retried after its Retry-After


RETRY_AFTER_S = 0.25  # a refusal without Retry-After is retried after this


def drive(
    service: LocalService, bodies: list[dict], concurrency: int, timeout_s: float = 300.0, retries: int = 0
) -> list[Outcome]:
    """POST each body to /v1/completions, `concurrency` at a time, a refusal (429 or 503) retried
    up to `retries` times after its `Retry-After` (as a client with backoff would); every
    outcome, in order."""

    def one(body: dict) -> Outcome:
        refusals = 0
        while True:
            start = time.perf_counter()
            try:
                url = f"{service.url}/v1/completions"
                reply = requests.post(url, json=body, headers=service.auth, timeout=timeout_s)
            except requests.Timeout:
                return Outcome(0, time.perf_counter() - start, {}, refusals)
            if reply.status_code not in (429, 503) or refusals == retries:
                return Outcome(reply.status_code, time.perf_counter() - start, reply.json(), refusals)
            refusals += 1
            time.sleep(float(reply.headers.get("Retry-After", RETRY_AFTER_S)))

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, bodies))


WHOLE_SEARCH = 4000  # tokens: room for the model's whole search (~2,400 at its widest): a request ends on its own


def countdown_bodies(count: int, budget_s: float | None, seed: int = 0, max_tokens: int = 1200) -> list[dict]:
    """Forking Countdown requests (test split); every other one with a latency budget. With
    the default `max_tokens` the widest searches are cut by it (WHOLE_SEARCH gives them room)."""
    chosen = problems.splits(0, 0, count + seed)["test"][seed:]
    bodies = [{"prompt": countdown_prompt(p), "max_tokens": max_tokens} for p in chosen]
    for body in bodies[::2] if budget_s else []:
        body["max_latency_s"] = budget_s
    return bodies


def missed(braids: list[dict]) -> list[tuple[float, str]]:
    """(latency / budget, finish reason) of each answer's `braid` part that missed its budget."""
    late = [b for b in braids if b["sla"]["met"] is False]
    return [(b["latency_s"] / b["sla"]["max_latency_s"], b["finish_reason"]) for b in late]


def summary(outcomes: list[Outcome], wall_s: float) -> dict:
    answered = [o for o in outcomes if o.status == 200]
    budgeted = [o.body["braid"]["sla"]["met"] for o in answered if o.body["braid"]["sla"]["met"] is not None]
    latencies = [o.latency_s for o in answered] or [0.0]
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "statuses": dict(sorted(Counter(o.status for o in outcomes).items())),
        "refused_then_retried": sum(o.refusals for o in outcomes),
        "throughput_rps": round(len(answered) / wall_s, 3),
        "p50_s": round(percentile(latencies, 0.5), 3),
        "p90_s": round(percentile(latencies, 0.9), 3),
        "p99_s": round(percentile(latencies, 0.99), 3),
        "sla_attainment": round(sum(budgeted) / len(budgeted), 3) if budgeted else None,
        "missed": [f"{ratio:.2f}x ({reason})" for ratio, reason in missed([o.body["braid"] for o in answered])],
    }


def memory_mb(replicas: list[Any]) -> list[float]:
    return [round(ray.get(r.memory_bytes.remote()) / 2**20, 1) for r in replicas]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-requests", type=int, default=8, help="the cluster's admission limit")
    parser.add_argument("--budget", type=float, default=5.0, help="max_latency_s of every other request")
    args = parser.parse_args()

    config = {"num_replicas": args.replicas, "max_requests": args.max_requests, "kv_cache_bytes": 64 * 2**20}
    with LocalService(num_cpus=args.replicas, **config) as service:
        replicas = service.replicas()
        drive(service, countdown_bodies(2, None, seed=1000), 1)  # warm-up
        baseline = memory_mb(replicas)
        start = time.perf_counter()
        alone = drive(service, countdown_bodies(max(1, args.requests // 4), args.budget, 500, WHOLE_SEARCH), 1)
        alone_stats = summary(alone, time.perf_counter() - start)
        start = time.perf_counter()
        loaded = drive(service, countdown_bodies(args.requests, args.budget, 0, WHOLE_SEARCH), args.concurrency,
                       retries=100)  # fmt: skip
        loaded_stats = summary(loaded, time.perf_counter() - start)
        reports = [ray.get(r.cache_report.remote()) for r in replicas]  # raises if a cache is inconsistent
        after = memory_mb(replicas)

    print(f"\n{args.requests} forking requests, {args.concurrency} clients, {args.replicas} replicas, "
          f"admission limit {args.max_requests} in flight; peer: one at a time")  # fmt: skip
    print(f"{'run':>12} {'answered':>9} {'req/s':>7} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'SLA met':>8} "
          f"{'refused':>7}  statuses")  # fmt: skip
    for name, stats in (("alone", alone_stats), ("under load", loaded_stats)):
        sla = "-" if stats["sla_attainment"] is None else f"{stats['sla_attainment']:.3f}"
        print(f"{name:>12} {stats['answered']:>9} {stats['throughput_rps']:>7.2f} {stats['p50_s']:>7.2f} "
              f"{stats['p90_s']:>7.2f} {stats['p99_s']:>7.2f} {sla:>8} {stats['refused_then_retried']:>7}  "
              f"{stats['statuses']}")  # fmt: skip
    if loaded_stats["missed"]:
        print(f"missed budgets under load, latency / budget: {', '.join(loaded_stats['missed'])}")
    leaked = sum(r["used_blocks"] for r in reports)
    growth = max(a - b for a, b in zip(after, baseline, strict=True))
    print(f"after: KV blocks in use {leaked} (integrity checked), replica memory MiB {baseline} -> {after}")
    print(json.dumps({"bench": "load", **{f"loaded_{k}": v for k, v in loaded_stats.items()},
                      "alone_p50_s": alone_stats["p50_s"], "leaked_blocks": leaked,
                      "memory_growth_mb": round(growth, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
