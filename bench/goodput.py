"""Goodput under load: answers within their budget per second, as offered load rises past
what one replica can do, for Braid's policy and for the policy it replaced.

    python -m bench.goodput [--budget 10] [--seconds 60] [--loads 0.5 1 2 4] [--burst 64]

A local Ray cluster with one replica of the embedded Countdown model and the HTTP app. First
the replica's capacity is measured (on Braid's cluster): requests a second it completes
with 8 in flight and no budget (the model's own fan-out). Then, for each policy in turn (a
fresh cluster each),
Countdown requests arrive open-loop (Poisson, a fixed seed) for `--seconds` at each
multiple of that capacity, every request with `max_latency_s` = `--budget`:

- braid: the coordinator admits a request only where it is predicted to answer in time,
  else refuses it at once (503, Retry-After); replicas run the earliest deadline first;
  the fan-out narrows under load (`policy="deadline"`);
- baseline (peer): every request admitted, every live thread run each step, the model's own
  fan-out (`policy="even"`: Braid before this policy).

Goodput counts answers that ended on their own within the budget and solve their problem
(the exact check), per second of arrivals. Per load: goodput, answers within budget, cut at
the deadline (ended by it: a miss), refused, and p50/p99 latency of the answers. Last, per
policy, a burst: `--burst` requests sent at once, as an SRE would try it. Prints a table,
saves `docs/goodput.png`, and ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.load import WHOLE_SEARCH, LocalService, percentile
from countdown import problems
from countdown.traces import prompt

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("braid", "baseline")
CONFIG = {"braid": {"policy": "deadline"}, "baseline": {"policy": "even"}}


def bodies(count: int, budget_s: float | None) -> list[dict]:
    """Countdown requests on the test problems, the same ones in the same order for every run."""
    chosen = problems.splits(0, 0, 1000)["test"][:count]
    extra = {} if budget_s is None else {"max_latency_s": budget_s}
    return [{"prompt": prompt(p), "max_tokens": WHOLE_SEARCH, **extra} for p in chosen]


def post(service: LocalService, body: dict) -> tuple[int, dict, float]:
    start = time.perf_counter()
    reply = requests.post(f"{service.url}/v1/completions", json=body, headers=service.auth, timeout=120)
    return reply.status_code, reply.json(), time.perf_counter() - start


def capacity(service: LocalService, count: int = 24, in_flight: int = 8) -> float:
    """Requests a second one replica completes, kept busy (no budget, the model's own fan-out)."""
    post(service, bodies(1, None)[0])  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        statuses = [status for status, _, _ in pool.map(lambda b: post(service, b), bodies(count, None))]
    assert all(status == 200 for status in statuses), statuses
    return count / (time.perf_counter() - start)


def open_loop(service: LocalService, rate: float, seconds: float, budget_s: float, seed: int) -> dict:
    """Poisson arrivals at `rate` a second for `seconds`; every outcome, summed up."""
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    sent = bodies(len(times), budget_s)
    outcomes: list[tuple[int, dict, float] | None] = [None] * len(sent)
    start = time.perf_counter()

    def send(i: int) -> None:
        time.sleep(max(0.0, start + times[i] - time.perf_counter()))
        outcomes[i] = post(service, sent[i])

    workers = [threading.Thread(target=send, args=(i,)) for i in range(len(sent))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return summarize([o for o in outcomes if o is not None], seconds)


def burst(service: LocalService, count: int, budget_s: float) -> dict:
    """`count` requests sent at the same moment; the answers' latencies include any refusal."""
    with ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(lambda b: post(service, b), bodies(count, budget_s)))
    stats = summarize(outcomes, 1.0)
    answered = [wall for status, _, wall in outcomes if status == 200]
    return {**stats, "slowest_answer_s": round(max(answered, default=0.0), 2)}


def summarize(outcomes: list[tuple[int, dict, float]], seconds: float) -> dict:
    answered = [body["braid"] for status, body, _ in outcomes if status == 200]
    met = [b for b in answered if b["sla"]["outcome"] == "met"]
    good = [b for b in met if b["accepted"]]
    latencies = [b["latency_s"] for b in met] or [0.0]
    caps = [str(b["fanout_cap"]) for b in answered]
    return {
        "requests": len(outcomes),
        "goodput_rps": round(len(good) / seconds, 3),
        "solved": len(good),
        "answered_in_budget": len(met),
        "cut": sum(1 for b in answered if b["sla"]["outcome"] == "truncated"),
        "late": sum(1 for b in answered if b["sla"]["outcome"] == "late"),
        "shaped": sum(1 for b in answered if b["sla"]["deadline_shaped"]),  # a fork refused, joined early, cut
        "refused": sum(1 for status, _, _ in outcomes if status in (429, 503)),
        "errors": sum(1 for status, _, _ in outcomes if status not in (200, 429, 503)),
        "admitted": len(answered),
        "p50_s": round(statistics.median(latencies), 2),
        "p99_s": round(percentile(latencies, 0.99), 2),
        "caps": {cap: caps.count(cap) for cap in sorted(set(caps))},
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, marker in (("braid", "o-"), ("baseline", "s--")):
        pts = [(r["load"], r["goodput_rps"]) for r in rows if r["policy"] == policy]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=policy)
    ax.set(xlabel="offered load (x one replica's capacity)", ylabel="goodput (solved within budget / s)",
           title="Countdown, 10 s budget, one replica, 2-core CPU")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=10.0, help="max_latency_s of every request")
    parser.add_argument("--seconds", type=float, default=60.0, help="arrivals at each load last this long")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--burst", type=int, default=64, help="requests sent at once after the loads (0: none)")
    args = parser.parse_args()

    rows, bursts, cap = [], {}, 0.0
    for policy in POLICIES:
        with LocalService(max_in_flight_per_key=4096, **CONFIG[policy]) as service:
            if not cap:
                cap = capacity(service)
                print(f"capacity of one replica: {cap:.2f} requests/s (8 in flight, no budget)", flush=True)
            print(f"{'policy':<9} {'load':>5} {'req/s':>6} {'sent':>5} {'goodput':>8} {'solved':>7} "
                  f"{'in budget':>9} {'cut':>4} {'late':>4} {'shaped':>6} {'refused':>7} "
                  f"{'p50 s':>6} {'p99 s':>6}  caps", flush=True)  # fmt: skip
            for i, load in enumerate(args.loads):
                stats = open_loop(service, load * cap, args.seconds, args.budget, args.seed + i)
                rows.append({"policy": policy, "load": load, "rate_rps": round(load * cap, 3), **stats})
                r = rows[-1]
                print(f"{policy:<9} {load:>5} {r['rate_rps']:>6.2f} {r['requests']:>5} {r['goodput_rps']:>8.3f} "
                      f"{r['solved']:>7} {r['answered_in_budget']:>9} {r['cut']:>4} {r['late']:>4} {r['shaped']:>6} "
                      f"{r['refused']:>7} {r['p50_s']:>6.2f} {r['p99_s']:>6.2f}  {r['caps']}", flush=True)  # fmt: skip
            if args.burst:
                b = bursts[policy] = burst(service, args.burst, args.budget)
                print(f"{policy}: {args.burst} at once: {b['solved']} solved in budget, {b['answered_in_budget']} "
                      f"answered in budget, {b['cut']} cut, {b['late']} late, {b['refused']} refused; "
                      f"slowest answer {b['slowest_answer_s']} s", flush=True)  # fmt: skip
    plot(rows, ROOT / "docs" / "goodput.png")
    braid = {r["load"]: r for r in rows if r["policy"] == "braid"}
    base = {r["load"]: r for r in rows if r["policy"] == "baseline"}
    top = max(args.loads)
    peak = max(r["goodput_rps"] for r in braid.values())
    floor = 1 / args.seconds  # a baseline that solved nothing counts as one answer: the ratio is a lower bound
    print(json.dumps({
        "bench": "goodput",
        "capacity_rps": round(cap, 3),
        "goodput_overload_over_peak": round(braid[top]["goodput_rps"] / peak, 3) if peak else 0.0,
        "goodput_over_baseline_overload": round(braid[top]["goodput_rps"] / max(base[top]["goodput_rps"], floor), 2),
        "cut_fraction_overload": round(braid[top]["cut"] / max(braid[top]["admitted"], 1), 3),
        "baseline_cut_fraction_overload": round(base[top]["cut"] / max(base[top]["admitted"], 1), 3),
        "burst_solved": {policy: b["solved"] for policy, b in bursts.items()},
        "rows": rows,
        "bursts": bursts,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
