"""A replica that stops answering without dying (its process frozen with SIGSTOP, as a hung
GPU or a stuck call would leave it), on a real local Ray cluster: the request on it ends at
its time limit with a clear error instead of hanging, new requests go to the live replica,
and once the process runs again it is live again and the timed-out request's threads are gone."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import ray

from actors.coordinator import NAMESPACE, replica_name
from cluster.config import ClusterConfig, start

TIME_LIMIT_S = 4.0
LONG = {"protocol": "threadweaver", "join_policy": "all", "max_total_tokens": 8000, "sampling": {"max_new_tokens": 600}}
SHORT = {"protocol": "threadweaver", "max_total_tokens": 300, "sampling": {"max_new_tokens": 200}}


@pytest.fixture(scope="module")
def coordinator():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = ClusterConfig(num_replicas=2, replica_cpus=0.5, kv_cache_bytes=32 * 2**20, kv_transfer=False,
                               request_timeout_s=TIME_LIMIT_S)  # fmt: skip
        yield start(config)
    finally:
        ray.shutdown()


def health(coordinator) -> dict:
    return ray.get(coordinator.health.remote(), timeout=10)


def wait_for(condition, timeout_s: float = 30.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return False


@contextmanager
def frozen(coordinator, index: int) -> Iterator[None]:
    """Replica `index`'s process stopped (SIGSTOP) for the block; afterwards, once it runs
    again, it must be live again and hold no request."""
    replica = ray.get_actor(replica_name(index), namespace=NAMESPACE)
    pid = ray.get(replica.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_for(lambda: health(coordinator)["live"] == 2), "the replica did not become live again"
    load = lambda: ray.get(replica.load_dict.remote(), timeout=10)  # noqa: E731
    assert wait_for(lambda: load()["requests"] == 0), "the timed-out request still runs on its replica"


def test_a_frozen_replica_ends_its_streamed_request_at_the_time_limit_and_gets_no_new_ones(coordinator) -> None:
    events = coordinator.stream.remote("92 51 8 3>49\n", LONG)
    admitted = ray.get(next(events))
    assert admitted["type"] == "admitted"
    with frozen(coordinator, admitted["replica"]):
        started = time.monotonic()
        short = ray.get(coordinator.generate.remote("10 17 3 2>22\n", SHORT), timeout=60)
        assert short["replica"] != admitted["replica"] and short["finish_reason"]  # served by the live one
        last = None
        for ref in events:  # the stream ends, with an error naming the time limit
            last = ray.get(ref, timeout=TIME_LIMIT_S + 30)
        assert last is not None and last["type"] == "error" and last.get("timed_out"), last
        assert "past its time limit" in last["error"] and f"replica {admitted['replica']}" in last["error"]
        assert time.monotonic() - started < TIME_LIMIT_S + 10
        assert wait_for(lambda: health(coordinator)["live"] == 1)  # it does not answer its load reads
    assert health(coordinator)["timeouts"] >= 1


def test_a_frozen_replica_ends_its_request_at_the_time_limit(coordinator) -> None:
    result = coordinator.generate.remote("95 91 78 36>72\n", LONG)
    loads = lambda: ray.get(coordinator.loads.remote(), timeout=10)  # noqa: E731
    assert wait_for(lambda: any(load["requests"] for load in loads()))
    index = next(i for i, load in enumerate(loads()) if load["requests"])
    with frozen(coordinator, index):
        started = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError, match="past its time limit"):
            ray.get(result, timeout=TIME_LIMIT_S + 30)
        assert time.monotonic() - started < TIME_LIMIT_S + 10


def test_a_replica_whose_engine_step_hangs_is_not_live_until_it_moves(coordinator) -> None:
    """Its actor still answers (the engine loop runs on a thread of its own), but a step that
    runs past STALL_S marks it stalled: no new requests, no children from its peers."""
    replica = ray.get_actor(replica_name(1), namespace=NAMESPACE)

    def hang_one_step(self) -> None:  # runs in the replica's process
        import actors.replica

        actors.replica.STALL_S = 1.0

        def once(threads, logits):
            self.engine.logits_processor = None
            time.sleep(6.0)
            return logits

        self.engine.logits_processor = once

    ray.get(replica.__ray_call__.remote(hang_one_step))
    stuck = replica.generate.remote("10 17 3 2>22\n", SHORT)
    assert wait_for(lambda: health(coordinator)["live"] == 1, timeout_s=5.0)
    assert ray.get(coordinator.generate.remote("11 19 5 2>30\n", SHORT), timeout=60)["replica"] == 0
    assert ray.get(stuck, timeout=60)["finish_reason"]  # the step ends: so does its request
    assert wait_for(lambda: health(coordinator)["live"] == 2)
