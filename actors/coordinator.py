"""The coordinator: places each request on a replica, and keeps the replicas connected.

`Coordinator` is the named Ray actor the Serve app and batch jobs find with
`get_coordinator()`; its decisions are `actors.placement.Placement`'s. Forked children
are placed by the replica that forks them (`ChildPlacement`), from its peers' loads.

Failure: when a request's replica dies mid-request, the request runs again, from its
prompt, on another replica (once per replica at most) while less than `retry_within_s`
has passed since it started; else it fails with `ReplicaFailed`, naming the replica. Ray
restarts a dead replica (`max_restarts`); once it answers again the coordinator forms the
process group anew, so it takes forked children (and their KV) again.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.placement import MIN_STEPS, Placement

COORDINATOR_NAME = "braid-coordinator"
NAMESPACE = "braid"


def replica_name(index: int) -> str:
    return f"braid-replica-{index}"


class ReplicaFailed(RuntimeError):
    """Every replica a request was tried on failed, or its deadline passed while retrying."""


class Refused(RuntimeError):
    """Not admitted: `status` is the HTTP status to answer (429 busy, 503 budget impossible)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)  # both in args: Ray pickles it to the caller
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


def free_port() -> int:
    """A TCP port free on this machine now (for a process group, an HTTP server, a test)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def free_address(host: str) -> str:
    return f"tcp://{host}:{free_port()}"


@ray.remote(num_cpus=0, max_restarts=-1)  # it only waits on replicas: no core; restarted whenever it dies
class Coordinator:
    """Async actor: many requests in flight, each awaiting its replica."""

    def __init__(
        self, num_replicas: int, affinity_margin: int = 1, kv_transfer: bool = True, retry_within_s: float = 60.0,
        max_requests: int = 256,
    ) -> None:  # fmt: skip
        """The replicas are found by name (`replica_name(i)`), so that a coordinator Ray restarts
        finds them again; `max_requests`: requests in flight across the cluster before new ones
        are refused (429)."""
        replicas = [ray.get_actor(replica_name(i), namespace=NAMESPACE) for i in range(num_replicas)]
        self.replicas = replicas
        self.max_requests = max_requests
        self.placement = Placement(len(replicas), affinity_margin)
        self.kv_transfer = kv_transfer
        self.retry_within_s = retry_within_s
        self.failures = 0  # replica failures seen by requests
        self._reconnecting: asyncio.Task | None = None

    async def connect(self) -> None:
        """Give every replica its peers and (with `kv_transfer`) a new process group for KV."""
        transfer = self.kv_transfer and len(self.replicas) > 1
        init = free_address(ray.util.get_node_ip_address()) if transfer else None
        await asyncio.gather(*[r.connect.remote(self.replicas, init) for r in self.replicas])

    async def admit(self, prompt: str, options: dict[str, Any] | None, tried: frozenset[int] = frozenset()) -> int:
        """The replica a request goes to, or refused fast: a full cluster (429), or a latency
        budget that holds fewer than MIN_STEPS steps at every replica's recent step time (503)."""
        if sum(self.placement.in_flight) >= self.max_requests:
            raise Refused(429, f"busy: {self.max_requests} requests in flight; retry later")
        budget = (options or {}).get("max_latency_s")
        if budget is None:
            return self.placement.choose(prompt, exclude=tried)
        step_s = [max(load["step_ms"], 1.0) / 1000 for load in await self.loads()]
        index = self.placement.choose_within(budget, step_s, exclude=tried)
        if index is None:
            floor = MIN_STEPS * min(step_s)
            raise Refused(503, f"max_latency_s={budget} cannot be met: {MIN_STEPS} steps take ~{floor:.3f} s now")
        return index

    async def stream(self, prompt: str, options: dict[str, Any] | None = None):
        """The request's events as they happen (see `Replica.generate_stream`); no retry once
        streaming has begun: a failed replica ends the stream with an error event. Cancelled
        (its caller went away), Ray cancels the replica's stream too, which ends the request."""
        index = await self.admit(prompt, options)
        self.placement.started(index)
        try:
            async for ref in self.replicas[index].generate_stream.remote(prompt, options):
                yield await ref
        except RayActorError as error:
            self.failures += 1
            self._reconnect_later()
            yield {"type": "error", "error": f"replica {index} failed mid-request: {error}"}
        finally:
            self.placement.finished(index)

    async def generate(self, prompt: str, options: dict[str, Any] | None = None) -> dict:
        start = time.monotonic()
        tried: set[int] = set()
        while True:
            index = await self.admit(prompt, options, frozenset(tried))
            self.placement.started(index)
            try:
                return await self.replicas[index].generate.remote(prompt, options)
            except RayActorError as error:
                self.failures += 1
                tried.add(index)
                self._reconnect_later()
                late = time.monotonic() - start >= self.retry_within_s
                if len(tried) == len(self.replicas) or late:
                    why = f"{self.retry_within_s:g} s have passed" if late else "no replica is left to try"
                    raise ReplicaFailed(f"replica {index} failed mid-request and {why}: {error}") from error
            finally:
                self.placement.finished(index)

    async def loads(self) -> list[dict]:
        return list(await asyncio.gather(*[r.load_dict.remote() for r in self.replicas]))

    async def placement_counts(self) -> list[dict]:
        return [await r.placement_counts.remote() for r in self.replicas]

    def num_replicas(self) -> int:
        return len(self.replicas)

    def replica(self, index: int) -> Any:
        return self.replicas[index]

    def _reconnect_later(self) -> None:
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self, timeout_s: float = 120.0) -> None:
        """Once every replica answers again (Ray restarted the dead one), connect them anew."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                await asyncio.gather(*[r.load_dict.remote() for r in self.replicas])
                break
            except RayActorError:
                await asyncio.sleep(0.5)
        await self.connect()


def get_coordinator() -> Any:
    """The running cluster's coordinator, found by name."""
    return ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
