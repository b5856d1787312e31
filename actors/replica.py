"""One model replica: an engine and its fork-join driver, stepping in a background thread.

`ReplicaWorker` is a plain class (tests use it without Ray); `Replica` is the Ray actor,
one per GPU (`num_gpus=1`) or a few CPU cores. Requests arrive on Ray's actor threads and
wait for their result while the loop thread steps every live thread of every request
together (continuous batching across requests).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import ray

from countdown.verify import claims_found, verify_claim
from engine.engine import Engine
from engine.forkjoin import ForkJoinEngine
from engine.sampling import SamplingParams
from engine.threads import ForkJoinOptions

# Task hooks for the join: (verifier, success test). "none" joins by the protocol alone.
TASKS = {"none": (None, None), "countdown": (verify_claim, claims_found)}


@dataclass(slots=True, frozen=True)
class ReplicaLoad:
    replica_id: int
    requests: int  # in flight
    running: int  # threads computing now
    waiting: int  # threads queued for the engine
    free_blocks: int  # KV blocks free or evictable
    total_blocks: int
    step_ms: float  # recent engine step time (moving average)


def options_from_dict(raw: dict[str, Any]) -> ForkJoinOptions:
    """ForkJoinOptions from plain JSON fields; unknown fields are an error, not ignored."""
    raw = dict(raw)
    sampling = SamplingParams(**raw.pop("sampling", {}))
    known = set(ForkJoinOptions.__dataclass_fields__) - {"sampling"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return replace(ForkJoinOptions(**raw), sampling=sampling)


class ReplicaWorker:
    def __init__(
        self, replica_id: int, model_path: str, device: str = "cpu", kv_cache_bytes: int = 256 * 2**20,
        task: str = "none",
    ) -> None:  # fmt: skip
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        self.replica_id = replica_id
        self.engine = Engine(model_path, device=device, kv_cache_bytes=kv_cache_bytes)
        verifier, succeeded = TASKS[task]
        self.forkjoin = ForkJoinEngine(self.engine, verifier=verifier, succeeded=succeeded)
        self._lock = threading.Lock()  # the engine is stepped by one thread at a time
        self._wake = threading.Event()
        self._done: dict[int, threading.Event] = {}
        self._results: dict[int, dict] = {}
        self._step_ms = 0.0
        self._stop = False
        self._loop_thread = threading.Thread(target=self._loop, name=f"replica-{replica_id}", daemon=True)
        self._loop_thread.start()

    def generate(self, prompt: str, options: dict[str, Any] | None = None) -> dict:
        """Run one fork-join request to its end; the result as a plain dict."""
        opts = options_from_dict(options or {})
        start = time.perf_counter()
        with self._lock:
            request_id = self.forkjoin.submit(prompt, opts)
            done = self._done[request_id] = threading.Event()
        self._wake.set()
        done.wait()
        with self._lock:
            del self._done[request_id]
            result = self._results.pop(request_id)
        result.update(replica=self.replica_id, latency_s=time.perf_counter() - start)
        return result

    def load(self) -> ReplicaLoad:
        sched = self.engine.scheduler
        cache = self.engine.cache
        return ReplicaLoad(
            self.replica_id, len(self._done), len(sched.running), len(sched.waiting),
            cache.num_available_blocks, cache.config.num_blocks, self._step_ms,
        )  # fmt: skip

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._loop_thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.forkjoin.has_work()
                if busy:
                    start = time.perf_counter()
                    finished = self.forkjoin.step()
                    self._step_ms = 0.9 * self._step_ms + 0.1 * 1000 * (time.perf_counter() - start)
                    for result in finished:
                        self._results[result.request_id] = result.to_dict()
                        self._done[result.request_id].set()
            if not busy:
                self._wake.wait(timeout=0.05)
                self._wake.clear()


@ray.remote(max_concurrency=256, max_restarts=3)
class Replica(ReplicaWorker):
    """The Ray actor: one engine per device."""

    def load_dict(self) -> dict:
        return asdict(self.load())
