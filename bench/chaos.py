"""Chaos: a bounded mixed load while replicas are killed and come back and the coordinator is
killed once. Does every request end, cleanly, and does the cluster come back?

    python -m bench.chaos [--seconds 120] [--clients 6]

A local Ray cluster with two replicas of the embedded Countdown model and the HTTP app.
`--clients` clients send Countdown requests one after another for `--seconds`, a mix: every
other one with a 10 s budget, every third one streamed, a third of them in the Multiverse
format (the rest ThreadWeaver). A refusal (429, 503) is sent again after its Retry-After
while its budget (or 60 s) lasts, as a client with backoff would. Meanwhile a replica is
killed at 20%, 40% and 60% of the run (Ray restarts it: it loads its model again) and the
coordinator at 50% (Ray restarts it too).

Each request ends one of these ways: answered (a result: for a stream, its last chunk);
failed_clean (an error in OpenAI's shape: a 4xx/5xx, or a stream's error event; a refusal
still standing when its time ran out); hung (no end within its budget + 30 s, or 60 s
without one); broken (the connection dropped with no error said: should not happen).
Afterwards: KV blocks still in use on each replica (leaked_blocks), and
recovery_s, from the last kill to the first 10 s window with answers at >= 80% of the rate
before the first kill (the peer: the same cluster and load, unharmed). Last line JSON.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
import requests

from actors.coordinator import NAMESPACE, replica_name
from bench.load import LocalService
from countdown import problems
from countdown.traces import prompt

BUDGET_S = 10.0
WINDOW_S = 10.0  # answers are counted in windows this long, for the recovery time
KILLS = {0.2: "replica", 0.4: "replica", 0.5: "coordinator", 0.6: "replica"}  # share of the run -> what dies


@dataclass(slots=True)
class Ended:
    how: str  # answered, failed_clean, hung
    at: float  # seconds since the start of the load
    why: str = ""


def request_body(i: int) -> dict:
    chosen = problems.splits(0, 0, 1000)["test"][i % 1000]
    body: dict = {"prompt": prompt(chosen), "max_tokens": 4000, "stream": i % 3 == 0}
    if i % 2 == 0:
        body["max_latency_s"] = BUDGET_S
    if i % 3 == 1:
        body["protocol"] = "multiverse"
    return body


def send(service: LocalService, body: dict, start: float) -> Ended:
    """One request to its end: retried after refusals while its time lasts."""
    limit = body.get("max_latency_s", 30.0) + 30.0
    end = time.monotonic() + limit
    while True:
        left = end - time.monotonic()
        try:
            reply = requests.post(f"{service.url}/v1/completions", json=body, headers=service.auth,
                                  stream=body["stream"], timeout=max(left, 0.1))  # fmt: skip
            if reply.status_code in (429, 503) and time.monotonic() + float(reply.headers.get("Retry-After", 1)) < end:
                time.sleep(float(reply.headers.get("Retry-After", 1)))
                continue
            if reply.status_code != 200:
                error = reply.json()["error"]  # a clear error has OpenAI's shape
                return Ended("failed_clean", time.monotonic() - start, f"{reply.status_code}: {error['message'][:80]}")
            if not body["stream"]:
                answered = bool(reply.json()["choices"][0]["finish_reason"])
                return Ended("answered" if answered else "failed_clean", time.monotonic() - start)
            return read_stream(reply, end, start)
        except requests.Timeout:
            return Ended("hung", time.monotonic() - start, f"no end within {limit:g} s")
        except requests.ConnectionError as error:  # (a stream's read timeout arrives as one too)
            how = "hung" if time.monotonic() >= end - 1 else "broken"
            return Ended(how, time.monotonic() - start, str(error)[:80])


def read_stream(reply: requests.Response, end: float, start: float) -> Ended:
    finished = False
    for line in reply.iter_lines():
        if time.monotonic() > end:
            return Ended("hung", time.monotonic() - start, "the stream went on past its time")
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return Ended("failed_clean", time.monotonic() - start, f"stream: {chunk['error']['message'][:80]}")
        finished = finished or any(c.get("finish_reason") for c in chunk.get("choices", []))
    return Ended("answered" if finished else "hung", time.monotonic() - start, "" if finished else "no last chunk")


def chaos(service: LocalService, seconds: float, start: float, kills: list[tuple[float, str]]) -> None:
    """Kill what KILLS says when it says; Ray restarts each."""
    for share, what in sorted(KILLS.items()):
        time.sleep(max(0.0, start + share * seconds - time.monotonic()))
        if what == "coordinator":
            ray.kill(service.coordinator, no_restart=False)
        else:  # each replica in turn (found by name: the coordinator may be restarting)
            ray.kill(ray.get_actor(replica_name(len(kills) % 2), namespace=NAMESPACE), no_restart=False)
        kills.append((time.monotonic() - start, what))
        print(f"{kills[-1][0]:6.1f} s  killed the {what}", flush=True)


def leaked_blocks(service: LocalService, timeout_s: float = 120.0) -> int:
    """KV blocks still in use on the replicas once everything has ended (replicas that are
    still coming back are waited for)."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            time.sleep(3)  # the last cancelled threads free their blocks at their replica's next step
            return sum(ray.get(r.cache_report.remote(), timeout=30)["used_blocks"] for r in service.replicas())
        except ray.exceptions.RayError:
            if time.monotonic() > end:
                raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long requests are sent")
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()

    with LocalService(num_cpus=3, max_in_flight_per_key=64, num_replicas=2) as service:
        ended: list[Ended] = []
        kills: list[tuple[float, str]] = []
        counter = iter(range(10**9))
        lock = threading.Lock()
        start = time.monotonic()

        def client() -> None:
            while time.monotonic() - start < args.seconds:
                with lock:
                    i = next(counter)
                result = send(service, request_body(i), start)
                with lock:
                    ended.append(result)
                if result.how != "answered":
                    print(f"{result.at:6.1f} s  {result.how}: {result.why}", flush=True)

        killer = threading.Thread(target=chaos, args=(service, args.seconds, start, kills), daemon=True)
        killer.start()
        with ThreadPoolExecutor(args.clients) as pool:
            for future in [pool.submit(client) for _ in range(args.clients)]:
                future.result()
        killer.join()
        leaked = leaked_blocks(service)

    answered_at = sorted(e.at for e in ended if e.how == "answered")
    first_kill, last_kill = kills[0][0], kills[-1][0]
    before = sum(1 for t in answered_at if t < first_kill) / first_kill
    recovery = None
    t = last_kill
    while t + WINDOW_S <= args.seconds + 30:
        if sum(1 for a in answered_at if t <= a < t + WINDOW_S) / WINDOW_S >= 0.8 * before:
            recovery = round(t - last_kill + WINDOW_S, 1)  # the window's end: by then it is back
            break
        t += 1.0
    counts = {how: sum(1 for e in ended if e.how == how) for how in ("answered", "failed_clean", "hung", "broken")}
    print(f"{len(ended)} requests: {counts}; {len(kills)} kills; answers before the first kill "
          f"{before:.2f}/s; leaked KV blocks {leaked}; recovery {recovery} s")  # fmt: skip
    print(json.dumps({"bench": "chaos", "requests": len(ended), **counts, "leaked_blocks": leaked,
                      "recovery_s": recovery, "answers_per_s_before": round(before, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
