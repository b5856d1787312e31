"""The coordinator: places each request on a replica by load, with prefix affinity.

`Placement` is the plain decision (tested without Ray); `Coordinator` is the named Ray
actor the Serve app and batch jobs find with `get_coordinator()`. A request goes to the
replica with the fewest requests in flight; when loads are within `affinity_margin`, to
the replica its prompt's prefix was last sent to, whose prefix index likely holds it.

What this does not do yet: place the children of one fork on different replicas (they
run on their parent's replica, batched there) — see the README's status.
"""

from __future__ import annotations

import zlib
from typing import Any

import ray

COORDINATOR_NAME = "braid-coordinator"
NAMESPACE = "braid"
AFFINITY_CHARS = 64  # the prompt prefix that decides affinity


class Placement:
    def __init__(self, num_replicas: int, affinity_margin: int = 1) -> None:
        if num_replicas < 1:
            raise ValueError("need at least one replica")
        self.in_flight = [0] * num_replicas
        self.affinity_margin = affinity_margin
        self.last_for_prefix: dict[int, int] = {}

    def choose(self, prompt: str) -> int:
        key = zlib.crc32(prompt[:AFFINITY_CHARS].encode())
        least = min(range(len(self.in_flight)), key=lambda i: (self.in_flight[i], i))
        sticky = self.last_for_prefix.get(key)
        if sticky is not None and self.in_flight[sticky] <= self.in_flight[least] + self.affinity_margin:
            least = sticky
        self.last_for_prefix[key] = least
        return least

    def started(self, replica: int) -> None:
        self.in_flight[replica] += 1

    def finished(self, replica: int) -> None:
        self.in_flight[replica] -= 1


@ray.remote
class Coordinator:
    """Async actor: many requests in flight, each awaiting its replica."""

    def __init__(self, replicas: list[Any], affinity_margin: int = 1) -> None:
        self.replicas = replicas
        self.placement = Placement(len(replicas), affinity_margin)

    async def generate(self, prompt: str, options: dict[str, Any] | None = None) -> dict:
        index = self.placement.choose(prompt)
        self.placement.started(index)
        try:
            return await self.replicas[index].generate.remote(prompt, options)
        finally:
            self.placement.finished(index)

    async def loads(self) -> list[dict]:
        return [await r.load_dict.remote() for r in self.replicas]

    def num_replicas(self) -> int:
        return len(self.replicas)


def get_coordinator() -> Any:
    """The running cluster's coordinator, found by name."""
    return ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
