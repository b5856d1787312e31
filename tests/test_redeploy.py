"""A Braid cluster already running on the Ray cluster, met by a new start: a batch job that
asks for something else is refused with the difference named; a redeploy (the Serve app
with a new configuration) replaces it; once the Serve app is gone, so is its cluster. On a
real local Ray cluster."""

from __future__ import annotations

import time

import pytest
import ray
from ray import serve

from actors.coordinator import (
    COORDINATOR_NAME,
    NAMESPACE,
    OWNER_CHECK_S,
    OWNER_GONE_CHECKS,
    get_coordinator,
    replica_name,
)
from cache_service.transfer import free_port
from cluster.auth import Access
from cluster.config import ClusterConfig, connect_or_start, named, stop
from cluster.serve import BraidAPI

SMALL = {"kv_cache_bytes": 16 * 2**20, "replica_cpus": 0.5}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_a_mismatched_cluster_is_refused_clearly_or_replaced(local_ray) -> None:
    first = connect_or_start(ClusterConfig(num_replicas=1, capacity=16, **SMALL))
    assert connect_or_start(ClusterConfig(num_replicas=1, capacity=16, **SMALL)) is not None  # the same: joined
    with pytest.raises(ValueError, match=r"num_replicas=1 \(asked: 2\)"):
        connect_or_start(ClusterConfig(num_replicas=2, **SMALL), must_match=("num_replicas",))
    assert ray.get(first.num_replicas.remote()) == 1  # the refusal left it running

    second = connect_or_start(ClusterConfig(num_replicas=2, capacity=4, **SMALL), replace=True)
    running = ray.get(second.cluster_config.remote())
    assert (running["num_replicas"], running["capacity"]) == (2, 4)
    result = ray.get(second.generate.remote("5 6 7 8>30\n", {"sampling": {"max_new_tokens": 8}}))
    assert result["finish_reason"]
    stop(2)
    for name in (replica_name(0), replica_name(1)):
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace=NAMESPACE)  # stopped: their cores (or GPUs) are free


def test_a_serve_apps_cluster_lives_through_redeploys_and_stops_when_the_app_is_gone(local_ray) -> None:
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    app = lambda capacity: BraidAPI.bind(  # noqa: E731
        ClusterConfig(num_replicas=1, capacity=capacity, detached=True, **SMALL), {}, Access(required=False)
    )
    serve.run(app(16), name="braid-owned")
    assert ray.get(get_coordinator().cluster_config.remote())["serve_app"] == "braid-owned"
    serve.run(app(8), name="braid-owned")  # a redeploy with a new configuration: the cluster replaced
    coordinator = get_coordinator()
    time.sleep(OWNER_CHECK_S * OWNER_GONE_CHECKS + 2)  # longer than a gone app takes to stop it
    assert ray.get(coordinator.cluster_config.remote(), timeout=10)["capacity"] == 8  # still there
    serve.shutdown()
    end = time.monotonic() + OWNER_CHECK_S * (OWNER_GONE_CHECKS + 1) + 30
    while named(COORDINATOR_NAME) or named(replica_name(0)):
        assert time.monotonic() < end, "the Braid cluster outlived the Serve app that started it"
        time.sleep(0.5)
