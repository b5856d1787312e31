"""A Ray cluster a user started beside Braid (`ray start --head`, as the README's batch
section has them do) is used only when asked for: `braid serve`, `braid demo`, the tests and
the benchmarks start a local cluster of their own otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cache_service.transfer import free_port
from tests.raynodes import RAY_ENV, ray_node

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import ray
from cluster.config import init_ray
print(init_ray({address!r}, num_cpus=1, include_dashboard=False))
print("gcs", ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def probe(address: str | None, env: dict[str, str]) -> list[str]:
    code = PROBE.format(address=address)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def test_a_running_cluster_is_joined_only_on_purpose() -> None:
    port = free_port()
    with ray_node("--head", f"--port={port}", "--num-cpus=1", wait_for=("127.0.0.1", port)):
        own = probe(None, {**RAY_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"})  # even with RAY_ADDRESS set
        assert own[0].startswith("a local Ray cluster of its own") and not own[1].endswith(f":{port}")
        joined = probe(f"127.0.0.1:{port}", RAY_ENV)
        assert joined[0].startswith("the running Ray cluster at") and joined[1].endswith(f":{port}")
