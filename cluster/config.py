"""Cluster configuration and start-up: replicas (one engine each) and the named coordinator."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import ray

from actors.coordinator import COORDINATOR_NAME, NAMESPACE, POLICIES, Coordinator, get_coordinator, replica_name
from actors.replica import Replica
from actors.tasks import task
from engine.model import DTYPES

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "countdown" / "model")
# The replicas' handles, held by the process that started them. Ray frees an actor when its
# last handle goes; without these, a coordinator that dies would take its replicas with it,
# and the coordinator Ray restarts would find them gone.
_STARTED_REPLICAS: list[Any] = []


@dataclass(slots=True, frozen=True)
class ClusterConfig:
    model_path: str = DEFAULT_MODEL
    served_model_name: str | None = None  # the name clients ask for (None: the checkpoint folder's name)
    dtype: str | None = None  # bfloat16, float16 or float32 (None: the checkpoint's; bf16 on CUDA; fp32 on CPUs)
    num_replicas: int = 1
    replica_cpus: float = 1.0  # per replica when there is no GPU
    replica_gpus: float = 0.0  # 1 on GPU clusters: one replica per GPU
    replica_resources: dict[str, float] | None = None  # Ray custom resources a replica needs: the nodes it may run on
    coordinator_resources: dict[str, float] | None = None  # the same for the coordinator (e.g. to keep it on the head)
    kv_cache_bytes: int = 256 * 2**20
    task: str = "countdown"  # built in ("countdown", "none": the protocol's own) or an import path (actors.tasks)
    verifier: str | None = None  # import path of (prompt, answer) -> bool, the answer check (None: the task's)
    capacity: int = 16  # live threads a replica takes before its forks spill to other replicas
    kv_transfer: bool = True  # send a fork's prefix KV to other replicas (else they recompute it)
    retry_within_s: float = 60.0  # a request whose replica died is retried elsewhere within this time
    request_timeout_s: float = 600.0  # the longest a request runs (one with a budget: its budget + 10 s); then 504
    max_requests: int = 256  # in flight across the cluster; more are refused with HTTP 429
    # "deadline": requests with a latency budget admitted where they are predicted to answer in
    # time, at the fan-out the load allows, their threads run earliest deadline first; "even":
    # every request admitted, every thread run each step (the peer bench.goodput measures)
    policy: str = "deadline"
    # threads one engine step computes at most ("deadline"): on a CPU core 32 keep a step near
    # 15 ms for the embedded model; a GPU takes hundreds in about the time of one
    max_step_threads: int = 32
    metrics_port: int | None = None  # the ingress's Prometheus port; replicas take the next free ones
    metrics_host: str = "127.0.0.1"  # the address metrics listen on (the Helm chart: 0.0.0.0, for Prometheus)
    detached: bool = False  # actors outlive the driver that started them (Serve deployments)
    serve_app: str | None = None  # the Serve app a detached cluster lives for: it stops once the app is gone

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if not (Path(self.model_path) / "config.json").exists():
            raise ValueError(f"{self.model_path} is not a checkpoint folder (no config.json)")
        task(self.task, self.verifier)  # a bad name or import path fails here, at start, not in a replica
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_step_threads < 1:
            raise ValueError(f"max_step_threads must be >= 1, got {self.max_step_threads}")

    @property
    def model_name(self) -> str:
        """What `/v1/models` lists and the metrics' `model` label says."""
        return self.served_model_name or Path(self.model_path).name


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
            resources=config.replica_resources or {},
            lifetime=lifetime,
        ).remote(
            i,
            config.model_path,
            device,
            config.kv_cache_bytes,
            config.task,
            config.capacity,
            threads,
            port,
            step_cap,
            config.metrics_host,
            config.model_name,
            config.dtype,
            config.verifier,
        )
        for i in range(config.num_replicas)
    ]
    ray.get([r.load_dict.remote() for r in replicas])  # wait until every engine has loaded
    _STARTED_REPLICAS[:] = replicas
    coordinator = Coordinator.options(
        name=COORDINATOR_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime=lifetime,
        resources=config.coordinator_resources or {},
    ).remote(len(replicas), kv_transfer=config.kv_transfer, retry_within_s=config.retry_within_s,
             max_requests=config.max_requests, task=config.task, verifier=config.verifier, policy=config.policy,
             request_timeout_s=config.request_timeout_s, cluster=asdict(config))  # fmt: skip
    ray.get(coordinator.connect.remote())
    ray.get(coordinator.warm_up.remote())
    return coordinator


def connect_or_start(config: ClusterConfig, must_match: tuple[str, ...] = (), replace: bool = False) -> Any:
    """The coordinator of the Braid cluster already running on this Ray cluster, or of a new one
    started from `config`. A running one whose configuration differs from `config` in a field
    of `must_match` is an error that names the fields; with `replace`, one that differs in any
    field is stopped and a new one started (a redeploy with a new configuration)."""
    try:
        coordinator = get_coordinator()
    except ValueError:
        return start(config)
    running = ray.get(coordinator.cluster_config.remote(), timeout=60)
    wanted = asdict(config)
    checked = [f.name for f in fields(ClusterConfig) if f.name != "detached"] if replace else must_match
    differ = [name for name in checked if running.get(name) != wanted[name]]
    if not differ:
        return coordinator
    if replace:
        stop(running["num_replicas"])
        return start(config)
    said = ", ".join(f"{name}={running.get(name)!r} (asked: {wanted[name]!r})" for name in differ)
    raise ValueError(f"Braid already runs on this Ray cluster with {said}; ask for the same, or stop it first")


def stop(num_replicas: int, timeout_s: float = 60.0) -> None:
    """Stop the running Braid cluster's coordinator and replicas (their KV and GPUs freed);
    returns once their names are free for a new cluster."""
    names = [COORDINATOR_NAME, *(replica_name(i) for i in range(num_replicas))]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            continue  # not there (already gone)
    _STARTED_REPLICAS.clear()
    end = time.monotonic() + timeout_s
    for name in names:
        while named(name):
            if time.monotonic() > end:
                raise TimeoutError(f"{name} was killed but still holds its name after {timeout_s:g} s")
            time.sleep(0.2)


def named(name: str) -> bool:
    """Whether an actor holds `name` in Braid's namespace."""
    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def init_ray(address: str | None, **local: Any) -> str:
    """Join the Ray cluster at `address` ("auto": the one `ray start` runs on this machine),
    or with None start a local one of this process's own (`ray.init` options `local`), even
    when another runs beside it; a line saying which."""
    if address is None:
        ray.init(address="local", **local)
        return "a local Ray cluster of its own (--address joins a running one)"
    ray.init(address=address)
    return f"the running Ray cluster at {ray.get_runtime_context().gcs_address}"
