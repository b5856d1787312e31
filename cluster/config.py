"""Cluster configuration and start-up: replicas (one engine each) and the named coordinator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.coordinator import COORDINATOR_NAME, NAMESPACE, Coordinator, get_coordinator
from actors.replica import TASKS, Replica

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "countdown" / "model")


@dataclass(slots=True, frozen=True)
class ClusterConfig:
    model_path: str = DEFAULT_MODEL
    num_replicas: int = 1
    replica_cpus: float = 1.0  # per replica when there is no GPU
    replica_gpus: float = 0.0  # 1 on GPU clusters: one replica per GPU
    kv_cache_bytes: int = 256 * 2**20
    task: str = "countdown"  # join verifier and success test ("none": the protocol's own)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if not (Path(self.model_path) / "config.json").exists():
            raise ValueError(f"{self.model_path} is not a checkpoint folder (no config.json)")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")


def start(config: ClusterConfig) -> Any:
    """Start the replicas and the coordinator on the connected Ray cluster; returns the coordinator."""
    device = "cuda" if config.replica_gpus else "cpu"
    replicas = [
        Replica.options(num_cpus=config.replica_cpus, num_gpus=config.replica_gpus).remote(
            i, config.model_path, device, config.kv_cache_bytes, config.task
        )
        for i in range(config.num_replicas)
    ]
    ray.get([r.load_dict.remote() for r in replicas])  # wait until every engine has loaded
    return Coordinator.options(name=COORDINATOR_NAME, namespace=NAMESPACE, get_if_exists=True).remote(replicas)


def connect_or_start(config: ClusterConfig) -> Any:
    """The coordinator already running on this Ray cluster, or a new one started from `config`."""
    try:
        return get_coordinator()
    except ValueError:
        return start(config)
