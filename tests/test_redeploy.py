"""A Braid cluster already running on the Ray cluster, met by a new start: a batch job that
asks for something else is refused with the difference named; a redeploy (the Serve app
with a new configuration) replaces it. On a real local Ray cluster."""

from __future__ import annotations

import pytest
import ray

from actors.coordinator import NAMESPACE, replica_name
from cluster.config import ClusterConfig, connect_or_start, stop

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
