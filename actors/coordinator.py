"""The coordinator: admits each request, places it on a replica, and keeps the replicas connected.

`Coordinator` is the named Ray actor the Serve app and batch jobs find with
`get_coordinator()`. Its decisions are plain classes': a request with a latency budget is
admitted where it is predicted to answer in time, at the fan-out cap the load allows
(`actors.admission.Admission`), or refused at once (503 with a retry time); one without
goes to the least loaded replica (`actors.placement.Placement`). Forked children are
placed by the replica that forks them (`ChildPlacement`), from its peers' loads.

Policies (`policy`): "deadline" (the default) is the above, with each replica running the
most urgent threads first, at most `max_step_threads` a step; "even" admits every request
(up to `max_requests`), runs every live thread each step and never narrows a fan-out:
Braid before deadline-aware admission, kept as the peer `bench.goodput` measures against.

A budget counts from the request's arrival (at the HTTP ingress, `received`; else here): a
replica is given what is left of it, and the latency a result reports (and its SLA outcome
is judged by) is measured from then too, so time spent before admission or on a failed
replica counts.

Health: a replica that does not answer the load read (every LOAD_REFRESH_S, each bounded by
CALL_TIMEOUT_S) or that a request saw fail is not live, and gets no new request until it
answers again (none live: 503). `health()` reports it, for readiness and metrics.

Time: a request runs at most `request_timeout_s` (and one with a budget at most its budget
plus LATE_GRACE_S: the engine cuts it at its deadline, so past that its replica is stuck);
then it is ended on its replica and fails with `RequestTimedOut` (HTTP 504).

Lifetime: a cluster a Serve app started (`serve_app` in its configuration) stops itself,
replicas first, once that app is gone (`serve shutdown`, `serve delete`): its GPUs are
freed. A redeploy keeps the app, so it keeps the cluster (or replaces it: `cluster.config`).

Failure: when a request's replica dies mid-request, the request runs again, from its
prompt, on another replica (once per replica at most) while less than `retry_within_s`
has passed since it started; else it fails with `ReplicaFailed`, naming the replica. Ray
restarts a dead replica (`max_restarts`); once it answers again the coordinator forms the
process group anew, so it takes forked children (and their KV) again.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, RayError

from actors.admission import Admission, Cost, ReplicaModel, StepTimes
from actors.outcomes import (
    LATE_GRACE_S,
    Refused,
    ReplicaFailed,
    RequestTimedOut,
    next_event,
    time_limit_s,
)
from actors.placement import Placement
from actors.tasks import task as load_task
from engine.threads import ForkJoinOptions

COORDINATOR_NAME = "braid-coordinator"
NAMESPACE = "braid"
POLICIES = ("deadline", "even")
LOAD_REFRESH_S = 0.2  # how often the coordinator reads the replicas' step times
CALL_TIMEOUT_S = 2.0  # a replica that does not answer a load read within this is not live
DOWN_RETRY_S = 5  # Retry-After when no replica is live
OWNER_CHECK_S = 5.0  # how often a cluster a Serve app started checks that the app is still there
OWNER_GONE_CHECKS = 3  # checks in a row finding it gone before the cluster stops (not: a restarting controller)
DEFAULT_PROTOCOL = ForkJoinOptions().protocol


def replica_name(index: int) -> str:
    return f"braid-replica-{index}"


@dataclass(slots=True, frozen=True)
class Admitted:
    """Where an admitted request runs, and as what (its fan-out capped by the coordinator)."""

    replica: int
    prompt: str
    options: dict[str, Any]
    width: int | None = None  # the fan-out cap chosen (None: the request's own)
    predicted_s: float | None = None  # its latency predicted at admission
    key: int | None = None  # its entry in the admission's backlog
    arrived: float = 0.0  # time.monotonic() when the coordinator received the request


@ray.remote(num_cpus=0, max_restarts=-1)  # it only waits on replicas: no core; restarted whenever it dies
class Coordinator:
    """Async actor: many requests in flight, each awaiting its replica."""

    def __init__(
        self, num_replicas: int, affinity_margin: int = 1, kv_transfer: bool = True, retry_within_s: float = 60.0,
        max_requests: int = 256, task: str = "none", verifier: str | None = None, policy: str = "deadline",
        request_timeout_s: float = 600.0, cluster: dict | None = None,
    ) -> None:  # fmt: skip
        """The replicas are found by name (`replica_name(i)`), so that a coordinator Ray restarts
        finds them again; `max_requests`: requests in flight across the cluster before new ones
        are refused (429); `task`: how fan-outs are narrowed and warmed up (`actors.tasks`;
        `verifier` replaces its answer check);
        `request_timeout_s`: the longest a request runs; `cluster`: the configuration the
        cluster was started with, for `cluster_config` (its `serve_app`: the app it lives for)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        replicas = [ray.get_actor(replica_name(i), namespace=NAMESPACE) for i in range(num_replicas)]
        self.replicas = replicas
        self.cluster = cluster or {}
        self.max_requests = max_requests
        self.placement = Placement(len(replicas), affinity_margin)
        self.task = load_task(task, verifier)
        self.policy = policy
        self.admission = Admission(len(replicas), time.monotonic())
        self.models = [ReplicaModel(StepTimes(), math.inf) for _ in replicas]
        self.kv_transfer = kv_transfer
        self.retry_within_s = retry_within_s
        self.request_timeout_s = request_timeout_s
        self.live = [True] * len(replicas)  # answered its last load read in time (connect() checked them)
        self.failures = 0  # replica failures seen by requests
        self.retries = 0  # requests run again on another replica after one failed
        self.restarts = 0  # replicas live again after they were not
        self.timeouts = 0  # requests that ran past their time
        self._reconnecting: asyncio.Task | None = None
        self._background: list[asyncio.Task] = []

    async def connect(self) -> None:
        """Give every replica its peers and (with `kv_transfer`) a new process group for KV."""
        transfer = self.kv_transfer and len(self.replicas) > 1
        # Rank 0 (replica 0) hosts the group's store, so the address is one of its node's, not
        # this node's: on KubeRay the coordinator is on the head pod and replicas on GPU pods.
        init = await asyncio.wait_for(self.replicas[0].rendezvous_address.remote(), 60) if transfer else None
        await asyncio.gather(*[r.connect.remote(self.replicas, init) for r in self.replicas])
        self._start_background()

    def _start_background(self) -> None:
        """Start, once per process, the load reads and (for a Serve app's cluster) the watch on
        the app: called by the first method a coordinator Ray restarted is asked for."""
        if self._background:
            return
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._refresh_loads()))
        if self.cluster.get("serve_app"):
            self._background.append(loop.create_task(self._watch_owner(self.cluster["serve_app"])))

    async def warm_up(self) -> None:
        """Run the task's warm-up prompts at every fan-out cap, spread over the replicas, all at
        once: the first costs admission predicts with, and the replicas' first step times. A
        replica that fails here is handled as one that fails a request (the cluster starts)."""
        pairs = list(itertools.product(self.task.warm_up, self.task.widths))
        placed, calls = [], []
        for i, (prompt, width) in enumerate(pairs):
            text, options = self.task.narrow(prompt, dict(self.task.options), width)
            admitted = Admitted(i % len(self.replicas), text, options, width, arrived=time.monotonic())
            placed.append(admitted.replica)
            calls.append(self._answered(admitted, self.replicas[admitted.replica].generate.remote(text, options)))
        for replica, outcome in zip(placed, await asyncio.gather(*calls, return_exceptions=True), strict=True):
            if isinstance(outcome, RayActorError):  # a fault like any other: not live until it answers again
                self._failed(replica)
            elif isinstance(outcome, BaseException):
                raise outcome
        await self._read_loads()

    async def admit(
        self, prompt: str, options: dict[str, Any], arrived: float, tried: frozenset[int] = frozenset(),
        spread: bool = False,
    ) -> Admitted:  # fmt: skip
        """Where a request that arrived at `arrived` goes and with what fan-out cap (its options
        carry what is left of its budget), or refused fast: a full cluster (429), or a latency
        budget it is not predicted to meet anywhere now (503). `spread` (a Join's samples of one
        prompt): by load alone, not to where the prompt went before."""
        self._start_background()
        if sum(self.placement.in_flight) >= self.max_requests:
            raise Refused(429, f"busy: {self.max_requests} requests in flight; retry later")
        tried = tried | {i for i, live in enumerate(self.live) if not live}
        if len(tried) == len(self.replicas):
            raise Refused(503, f"no replica is live now (of {len(self.replicas)}); retry in {DOWN_RETRY_S} s",
                          DOWN_RETRY_S)  # fmt: skip
        budget = options.get("max_latency_s")
        if budget is not None:
            budget -= time.monotonic() - arrived
            if budget <= 0:
                raise Refused(503, "the request's latency budget ran out before it could be placed", 1)
            options = {**options, "max_latency_s": budget}
        if budget is None or self.policy == "even":
            replica = self.placement.choose(prompt, exclude=tried, affinity=not spread)
            return Admitted(replica, prompt, options, arrived=arrived)
        protocol = options.get("protocol") or DEFAULT_PROTOCOL
        limit = float(options.get("sampling", {}).get("max_new_tokens") or options.get("max_total_tokens") or 1024)
        prior = Cost(limit, limit)  # nothing learned yet: as long as the request may run
        now = time.monotonic()
        decision = self.admission.admit(budget, protocol, self.task.widths, self.models, now, prior, tried)
        if decision.replica is None:
            retry = math.ceil(decision.retry_after_s)
            raise Refused(503, f"max_latency_s={budget:g} cannot be met now: with the work queued, the request is "
                               f"not predicted to answer in time; retry in {retry} s", retry)  # fmt: skip
        text, narrowed = self.task.narrow(prompt, options, decision.width)
        key = self.admission.started(decision)
        return Admitted(decision.replica, text, narrowed, decision.width, decision.predicted_s, key, arrived)

    async def stream(
        self, prompt: str, options: dict[str, Any] | None = None, received: float | None = None, spread: bool = False
    ):
        """The request's events as they happen (see `Replica.generate_stream`), first an
        "admitted" event: a caller reads it before it answers its own client, so a refusal
        (Refused, raised before any event) is an HTTP status, not an error in a stream. No
        retry once streaming has begun: a failed replica ends the stream with an error event.
        Cancelled (its caller went away), Ray cancels the replica's stream too, which ends the
        request."""
        admitted = await self.admit(prompt, options or {}, arrival(received), spread=spread)
        self.placement.started(admitted.replica)
        yield {"type": "admitted", "replica": admitted.replica, "fanout_cap": admitted.width}
        events = self.replicas[admitted.replica].generate_stream.remote(admitted.prompt, admitted.options)
        end = admitted.arrived + time_limit_s(options or {}, self.request_timeout_s)
        try:
            while True:
                event = await asyncio.wait_for(next_event(events), end - time.monotonic())
                if event is None:
                    return
                if event["type"] == "result":
                    self._observe(admitted, event["result"])
                yield event
        except RayActorError as error:
            self._failed(admitted.replica)
            yield {"type": "error", "error": f"replica {admitted.replica} failed mid-request: {error}"}
        except TimeoutError:
            ray.cancel(events)  # closes the replica's stream, which ends the request there
            yield {"type": "error", "error": str(self._timed_out(admitted)), "timed_out": True}
        finally:
            self._done(admitted)

    async def generate(self, prompt: str, options: dict[str, Any] | None = None, received: float | None = None) -> dict:
        """The request's result; `received`: when it reached Braid (`time.time()` at the HTTP
        ingress; None: now), which its latency budget counts from."""
        async for event in self._run(prompt, options, received):
            if event["type"] == "result":
                return event["result"]
        raise AssertionError("_run ends with a result or raises")

    async def outcome(
        self, prompt: str, options: dict[str, Any] | None = None, received: float | None = None, spread: bool = False
    ):
        """`generate` as a stream of two events, for a caller that must know when the request
        is admitted (a Join, before it answers its client): "admitted" once it is placed (a
        refusal raises before it), then "result". Cancelled, it ends on its replica too."""
        async for event in self._run(prompt, options, received, spread):
            yield event

    async def _run(self, prompt: str, options: dict[str, Any] | None, received: float | None, spread: bool = False):
        """ "admitted" (once), then "result"; a replica failing mid-request: run again elsewhere."""
        start = arrival(received)
        end = start + time_limit_s(options or {}, self.request_timeout_s)
        tried: set[int] = set()
        result = None
        while result is None:
            admitted = await self.admit(prompt, options or {}, start, frozenset(tried), spread)
            self.placement.started(admitted.replica)
            replica = self.replicas[admitted.replica]
            key = uuid.uuid4().hex
            call = self._answered(admitted, replica.generate.remote(admitted.prompt, admitted.options, key))
            try:
                if not tried:
                    yield {"type": "admitted", "replica": admitted.replica, "fanout_cap": admitted.width}
                result = await asyncio.wait_for(call, end - time.monotonic())
            except asyncio.CancelledError:  # its caller went away (`ray.cancel`): end it on its replica too
                replica.cancel.remote(key)
                raise
            except TimeoutError:
                replica.cancel.remote(key)
                raise self._timed_out(admitted) from None
            except RayActorError as error:
                self._failed(admitted.replica)
                tried.add(admitted.replica)
                late = time.monotonic() - start >= self.retry_within_s
                if len(tried) == len(self.replicas) or late:
                    why = f"{self.retry_within_s:g} s have passed" if late else "no replica is left to try"
                    raise ReplicaFailed(f"replica {admitted.replica} failed mid-request and {why}: {error}") from error
                self.retries += 1
            finally:
                self._done(admitted)
        yield {"type": "result", "result": result}

    def _timed_out(self, admitted: Admitted) -> RequestTimedOut:
        self.timeouts += 1
        ran = time.monotonic() - admitted.arrived
        return RequestTimedOut(
            f"the request ran {ran:.1f} s on replica {admitted.replica}, past its time limit "
            f"(request_timeout_s={self.request_timeout_s:g}, or its budget + {LATE_GRACE_S:g} s)"
        )

    async def _answered(self, admitted: Admitted, ref: Any) -> dict:
        """The result of a replica's `generate` call (`ref`), observed."""
        return self._observe(admitted, await ref)

    def _observe(self, admitted: Admitted, result: dict) -> dict:
        """Learn the request's cost at its fan-out cap; the result with the cap, the prediction
        and its latency as measured here (from its arrival, not its replica's)."""
        result["latency_s"] = time.monotonic() - admitted.arrived
        protocol = admitted.options.get("protocol") or DEFAULT_PROTOCOL
        usage = result["usage"]
        # Whole: it ended on its own and its deadline did not shape it. One that was shaped wrote
        # less than it would have: it may raise its cost, never lower it (else under load costs
        # fall and admission lets in more than fits).
        whole = result["finish_reason"] == "stop" and not result["deadline_shaped"]
        self.admission.costs.observe(
            protocol, admitted.width, usage["generated_tokens"], usage["critical_path_tokens"], whole
        )
        if admitted.key is not None:
            self.admission.finished(admitted.replica, admitted.key, result["latency_s"], whole)
        result.update(fanout_cap=admitted.width, predicted_latency_s=admitted.predicted_s)
        return result

    def _done(self, admitted: Admitted) -> None:
        self.placement.finished(admitted.replica)
        if admitted.key is not None:
            self.admission.cancelled(admitted.replica, admitted.key)  # (a no-op once observed)

    async def loads(self) -> list[dict]:
        return list(await asyncio.gather(*[r.load_dict.remote() for r in self.replicas]))

    async def _refresh_loads(self) -> None:
        while True:
            await self._read_loads()
            await asyncio.sleep(LOAD_REFRESH_S)

    async def _read_loads(self) -> None:
        """Each replica's step time, as its admission model, and whether it is live: one that does
        not answer within CALL_TIMEOUT_S (dead, restarting, stuck), or whose engine step has
        run too long (`stalled`: hung), gets no new requests until it answers, its engine moving."""
        calls = [asyncio.wait_for(r.load_dict.remote(), CALL_TIMEOUT_S) for r in self.replicas]
        for i, load in enumerate(await asyncio.gather(*calls, return_exceptions=True)):
            if not isinstance(load, dict):
                if isinstance(load, RayActorError) and self.live[i]:  # died (not slow): its group goes
                    self._reconnect_later()
                self.live[i] = False
                continue
            if load["stalled"]:
                self.live[i] = False
                continue
            if not self.live[i]:
                self.live[i] = True
                self.restarts += 1
            step = StepTimes({int(n): ms / 1000 for n, ms in load["step_ms_by_threads"].items()})
            self.models[i] = ReplicaModel(step, load["max_step_threads"] or math.inf, load["full_rate"])

    def _failed(self, replica: int) -> None:
        """A request saw `replica` fail: no new requests there until it answers a load read again."""
        self.failures += 1
        self.live[replica] = False
        self._reconnect_later()

    async def health(self) -> dict:
        """For readiness and metrics: replicas configured and live, what failed so far, and
        what admission has learned of its predictions (correction and margin)."""
        self._start_background()
        return {"configured": len(self.replicas), "live": sum(self.live), "failures": self.failures,
                "retries": self.retries, "restarts": self.restarts, "timeouts": self.timeouts,
                "latency_correction": self.admission.scale, "admission_margin": self.admission.margin}  # fmt: skip

    def costs(self) -> dict[str, dict]:
        """What admission has learned: each (protocol, fan-out cap)'s expected cost."""
        return {f"{protocol}/{width}": asdict(cost) for (protocol, width), cost in self.admission.costs.table.items()}

    async def placement_counts(self) -> list[dict]:
        return [await r.placement_counts.remote() for r in self.replicas]

    def cluster_config(self) -> dict:
        """The configuration this cluster was started with (`cluster.config.ClusterConfig` fields)."""
        return self.cluster

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
                await asyncio.gather(*[asyncio.wait_for(r.load_dict.remote(), CALL_TIMEOUT_S) for r in self.replicas])
                break
            except (RayActorError, TimeoutError):
                await asyncio.sleep(0.5)
        await self.connect()

    async def _watch_owner(self, app: str) -> None:
        """Stop this cluster (replicas, then this actor) once the Serve app `app` is gone."""
        gone = 0
        while gone < OWNER_GONE_CHECKS:
            await asyncio.sleep(OWNER_CHECK_S)
            gone = 0 if await asyncio.to_thread(serve_app_running, app) else gone + 1
        print(f"The Serve app {app!r} that started this Braid cluster is gone: stopping its replicas.", flush=True)
        for replica in self.replicas:
            ray.kill(replica, no_restart=True)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def serve_app_running(app: str) -> bool:
    """Whether Ray Serve has the application `app` (and is not deleting it); an unreachable
    Serve controller (shut down) has none."""
    try:
        status = serve.status().applications.get(app)
    except RayError:
        return False
    return status is not None and status.status != "DELETING"


def arrival(received: float | None) -> float:
    """`received` (wall-clock seconds, taken by another process: the ingress) on this process's
    monotonic clock; None: now."""
    now = time.monotonic()
    return now if received is None else now - max(0.0, time.time() - received)


def get_coordinator() -> Any:
    """The running cluster's coordinator, found by name."""
    return ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
