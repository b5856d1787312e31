"""Cluster configuration and start-up: replicas (one engine each) and the named coordinator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.coordinator import COORDINATOR_NAME, NAMESPACE, POLICIES, Coordinator, get_coordinator, replica_name
from actors.replica import Replica
from actors.tasks import TASKS

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "countdown" / "model")
# The replicas' handles, held by the process that started them. Ray frees an actor when its
# last handle goes; without these, a coordinator that dies would take its replicas with it,
# and the coordinator Ray restarts would find them gone.
_STARTED_REPLICAS: list[Any] = []


@dataclass(slots=True, frozen=True)
class ClusterConfig:
    model_path: str = DEFAULT_MODEL
    num_replicas: int = 1
    replica_cpus: float = 1.0  # per replica when there is no GPU
    replica_gpus: float = 0.0  # 1 on GPU clusters: one replica per GPU
    kv_cache_bytes: int = 256 * 2**20
    task: str = "countdown"  # join verifier and success test ("none": the protocol's own)
    capacity: int = 16  # live threads a replica takes before its forks spill to other replicas
    kv_transfer: bool = True  # send a fork's prefix KV to other replicas (else they recompute it)
    retry_within_s: float = 60.0  # a request whose replica died is retried elsewhere within this time
    max_requests: int = 256  # in flight across the cluster; more are refused with HTTP 429
    # "deadline": requests with a latency budget admitted where they are predicted to answer in
    # time, at the fan-out the load allows, their threads run earliest deadline first; "even":
    # every request admitted, every thread run each step (the peer bench.goodput measures)
    policy: str = "deadline"
    # threads one engine step computes at most ("deadline"): on a CPU core 32 keep a step near
    # 15 ms for the embedded model; a GPU takes hundreds in about the time of one
    max_step_threads: int = 32
    metrics_port: int | None = None  # the ingress's Prometheus port; replicas take the next free ones
    detached: bool = False  # actors outlive the driver that started them (Serve deployments)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if not (Path(self.model_path) / "config.json").exists():
            raise ValueError(f"{self.model_path} is not a checkpoint folder (no config.json)")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.max_step_threads < 1:
            raise ValueError(f"max_step_threads must be >= 1, got {self.max_step_threads}")


def start(config: ClusterConfig) -> Any:
    """Start the replicas and the coordinator on the connected Ray cluster; returns the coordinator."""
    device = "cuda" if config.replica_gpus else "cpu"
    threads = 0 if config.replica_gpus else max(1, int(config.replica_cpus))  # torch threads = its cores
    lifetime = "detached" if config.detached else None
    port = None if config.metrics_port is None else config.metrics_port + 1  # each replica takes the first free one
    step_cap = config.max_step_threads if config.policy == "deadline" else None
    replicas = [
        Replica.options(
            name=replica_name(i),
            namespace=NAMESPACE,
            num_cpus=config.replica_cpus,
            num_gpus=config.replica_gpus,
            lifetime=lifetime,
        ).remote(
            i, config.model_path, device, config.kv_cache_bytes, config.task, config.capacity, threads, port, step_cap
        )
        for i in range(config.num_replicas)
    ]
    ray.get([r.load_dict.remote() for r in replicas])  # wait until every engine has loaded
    _STARTED_REPLICAS[:] = replicas
    coordinator = Coordinator.options(
        name=COORDINATOR_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime=lifetime
    ).remote(len(replicas), kv_transfer=config.kv_transfer, retry_within_s=config.retry_within_s,
             max_requests=config.max_requests, task=config.task, policy=config.policy)  # fmt: skip
    ray.get(coordinator.connect.remote())
    ray.get(coordinator.warm_up.remote())
    return coordinator


def connect_or_start(config: ClusterConfig) -> Any:
    """The coordinator already running on this Ray cluster, or a new one started from `config`."""
    try:
        return get_coordinator()
    except ValueError:
        return start(config)
