"""Placement decisions, as plain classes: where a request goes, where a forked child runs,
and how its prefix gets there.

- `Placement` (the coordinator's): a request goes to the replica with the fewest requests
  in flight; when loads are within `affinity_margin`, to the replica its prompt's prefix
  was last sent to, whose prefix index likely holds it. (A request with a latency budget
  is placed by `actors.admission` instead.)
- `ChildPlacement` (each replica's, for its forks): a child stays local while the local
  replica has room (fewer live threads than `capacity`). Otherwise it goes to the peer
  with the most room, when the wait it saves (one step per thread over capacity here)
  is worth more than getting the prefix there — the cheaper of sending its KV (measured
  bandwidth) and recomputing it there (measured prefill speed), or nothing when that
  peer was sent this prefix before (the last `SENT_PREFIXES` are remembered). Under a
  latency budget a child moves only when its prefix gets there well within the time it
  has before its join (`MAX_MOVE_SHARE`).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

AFFINITY_CHARS = 64  # the prompt prefix that decides request affinity
MAX_MOVE_SHARE = 0.25  # of a child's time before its join, at most, spent getting its prefix elsewhere
SENT_PREFIXES = 1024  # (peer, prefix) pairs a replica remembers sending; older ones are sent again if needed


class Placement:
    def __init__(self, num_replicas: int, affinity_margin: int = 1) -> None:
        if num_replicas < 1:
            raise ValueError("need at least one replica")
        self.in_flight = [0] * num_replicas
        self.affinity_margin = affinity_margin
        self.last_for_prefix: dict[int, int] = {}

    def choose(self, prompt: str, exclude: frozenset[int] = frozenset(), affinity: bool = True) -> int:
        key = zlib.crc32(prompt[:AFFINITY_CHARS].encode())
        candidates = [i for i in range(len(self.in_flight)) if i not in exclude]
        if not candidates:
            raise ValueError("no replica left to place on")
        least = min(candidates, key=lambda i: (self.in_flight[i], i))
        sticky = self.last_for_prefix.get(key) if affinity else None
        if sticky in candidates and self.in_flight[sticky] <= self.in_flight[least] + self.affinity_margin:
            least = sticky
        self.last_for_prefix[key] = least
        return least

    def started(self, replica: int) -> None:
        self.in_flight[replica] += 1

    def finished(self, replica: int) -> None:
        self.in_flight[replica] -= 1


@dataclass(slots=True)
class PrefixCost:
    """What moving a prefix to another replica costs, from measurements (moving averages)."""

    bandwidth_bytes_s: float = 200e6  # KV transfer; a first guess until a transfer is measured
    latency_s: float = 0.002  # per transfer: the request to the peer and the process-group handshake
    prefill_tokens_s: float = 2000.0  # recompute; a first guess until a prefill is measured

    def transfer_s(self, num_bytes: int) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_s

    def recompute_s(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_s

    def observe_transfer(self, num_bytes: int, seconds: float) -> None:
        if seconds > 0 and num_bytes > 0:
            self.bandwidth_bytes_s = 0.7 * self.bandwidth_bytes_s + 0.3 * num_bytes / seconds

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if seconds > 0 and num_tokens > 0:
            self.prefill_tokens_s = 0.7 * self.prefill_tokens_s + 0.3 * num_tokens / seconds


@dataclass(slots=True, frozen=True)
class ChildChoice:
    replica: int | None  # None: run it here
    prefix: str = "local"  # how the prefix gets there: "local", "cached", "transfer" or "recompute"
    cost_s: float = 0.0  # the estimated cost of getting it there
    ready: Any = None  # "cached": what was recorded with the prefix's transfer (the child waits for it)


class ChildPlacement:
    def __init__(self, replica_id: int, capacity: int, cost: PrefixCost | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.replica_id = replica_id
        self.capacity = capacity
        self.cost = cost or PrefixCost()
        # (peer, prefix key) already there -> what `record` was given with it; oldest first
        self.sent: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def how(self, peer: int, prefix_key: int, num_tokens: int, num_bytes: int) -> ChildChoice:
        """The cheapest way to get a prefix to `peer`."""
        if (peer, prefix_key) in self.sent:
            self.sent.move_to_end((peer, prefix_key))
            return ChildChoice(peer, "cached", 0.0, self.sent[peer, prefix_key])
        transfer, recompute = self.cost.transfer_s(num_bytes), self.cost.recompute_s(num_tokens)
        if transfer <= recompute:
            return ChildChoice(peer, "transfer", transfer)
        return ChildChoice(peer, "recompute", recompute)

    def choose(
        self, local_threads: int, peer_threads: dict[int, int], step_s: float, prefix_key: int, num_tokens: int,
        num_bytes: int, deadline_s: float | None = None,
    ) -> ChildChoice:  # fmt: skip
        """Where a new child runs, given live threads here and on each peer, a step's time here,
        and (under a latency budget) the seconds the child has before its join."""
        if local_threads < self.capacity:
            return ChildChoice(None)
        roomy = {p: n for p, n in peer_threads.items() if p != self.replica_id and n < self.capacity}
        if not roomy:
            return ChildChoice(None)
        peer = min(roomy, key=lambda p: (roomy[p], p))
        choice = self.how(peer, prefix_key, num_tokens, num_bytes)
        if deadline_s is not None and choice.cost_s > MAX_MOVE_SHARE * deadline_s:
            return ChildChoice(None)
        saved_s = step_s * (local_threads - self.capacity + 1)  # the queue the child skips here, roughly
        return choice if choice.cost_s < saved_s or choice.prefix == "cached" else ChildChoice(None)

    def record(self, choice: ChildChoice, prefix_key: int, ready: Any = None) -> None:
        """Remember that `choice` moved this prefix to its peer; `ready` (e.g. the transfer's
        result) comes back with every later "cached" choice for it."""
        if choice.replica is not None and choice.prefix in ("transfer", "recompute"):
            self.sent[choice.replica, prefix_key] = ready
            if len(self.sent) > SENT_PREFIXES:
                self.sent.popitem(last=False)
