"""The KV process group across nodes with addresses of their own: a Ray head on this machine
and a worker node in a network namespace (its own IP, reached over a veth pair), the
replicas on the worker node and the coordinator on the head, as on KubeRay (head pod, GPU
pods). Rank 0 must host the group's store at an address of its own node. Needs root (the
test makes and removes the namespace); skipped where namespaces cannot be made."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache_service.transfer import free_port
from tests.raynodes import RAY_ENV, ray_node

NS, HOST_IF, NS_IF = "braid-test-ns", "braid-h0", "braid-n0"
HOST_IP, NS_IP = "10.231.77.1", "10.231.77.2"
ROOT = Path(__file__).resolve().parents[1]


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


def can_make_namespaces() -> bool:
    try:
        sh("ip", "netns", "add", NS + "-probe")
        sh("ip", "netns", "del", NS + "-probe")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


@pytest.fixture
def two_nodes() -> Iterator[str]:
    if not can_make_namespaces():
        pytest.skip("network namespaces cannot be made here (needs root and iproute2)")
    sh("ip", "netns", "add", NS)
    try:
        try:
            sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
            sh("ip", "link", "set", NS_IF, "netns", NS)
            sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
            sh("ip", "link", "set", HOST_IF, "up")
            for command in (["ip", "addr", "add", f"{NS_IP}/24", "dev", NS_IF], ["ip", "link", "set", NS_IF, "up"],
                            ["ip", "link", "set", "lo", "up"]):  # fmt: skip
                sh("ip", "netns", "exec", NS, *command)
        except subprocess.CalledProcessError as error:  # e.g. a container without the right to make links
            pytest.skip(f"the test network cannot be made here: {error.stderr.decode().strip()}")
        port = free_port()
        head = ("--head", f"--node-ip-address={HOST_IP}", f"--port={port}", "--num-cpus=1", '--resources={"head": 1}')
        worker = (f"--address={HOST_IP}:{port}", f"--node-ip-address={NS_IP}", "--num-cpus=2",
                  '--resources={"worker_node": 2}')  # fmt: skip
        with ray_node(*head, wait_for=(HOST_IP, port)), ray_node(*worker, prefix=("ip", "netns", "exec", NS)):
            yield f"{HOST_IP}:{port}"
    finally:
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True, timeout=60)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, timeout=60)


# Run in a process of its own, with the environment as it was before the suite's other Ray
# clusters set variables in it: with those, the first actors on this cluster were cancelled
# ("all references removed") when the suite ran in one process.
CHECK = """
import sys, time
import ray
from cluster.config import ClusterConfig, start

address, host_ip, ns_ip = sys.argv[1:]
ray.init(address=address, _node_ip_address=host_ip, log_to_driver=False)
end = time.monotonic() + 60
while not any(n["Alive"] and n["NodeManagerAddress"] == ns_ip for n in ray.nodes()):
    assert time.monotonic() < end, "the worker node never joined"
    time.sleep(0.5)
config = ClusterConfig(num_replicas=2, replica_cpus=1, replica_resources={"worker_node": 1},
                       coordinator_resources={"head": 1}, kv_cache_bytes=32 * 2**20, capacity=1)
coordinator = start(config)  # the group forms in connect(): it timed out here before rank 0 chose its address
replica = ray.get(coordinator.replica.remote(0))
assert ray.get(replica.__ray_call__.remote(lambda self: ray.util.get_node_ip_address())) == ns_ip
assert ray.get(coordinator.__ray_call__.remote(lambda self: ray.util.get_node_ip_address())) == host_ip
options = {"protocol": "threadweaver", "join_policy": "all", "max_total_tokens": 8000}
result = ray.get(coordinator.generate.remote("92 51 8 3>49\\n", options), timeout=300)
counts = ray.get(coordinator.placement_counts.remote())
# "length": with join_policy all the root's context can reach the model's 2048 positions
assert result["finish_reason"] in ("stop", "length"), result["finish_reason"]
assert sum(c["transfer"] for c in counts) > 0, counts  # a prefix went over the group
print("ok")
"""


def test_the_kv_group_forms_across_nodes_and_moves_a_prefix(two_nodes: str) -> None:
    done = subprocess.run([sys.executable, "-c", CHECK, two_nodes, HOST_IP, NS_IP], cwd=ROOT, env=RAY_ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
