"""One model replica: an engine and its fork-join driver, stepping in a background thread.

`ReplicaWorker` is a plain class (tests use it without Ray); `Replica` is the Ray actor,
one per GPU (`num_gpus=1`) or a few CPU cores. Requests arrive on Ray's actor threads and
wait for their result while the loop thread steps every live thread of every request
together (continuous batching across requests).

Forks spread over replicas: once `connect()` has given a replica its peers (and a place
in the process group that carries KV), each child of a context-continuing fork is
placed by `ChildPlacement` — here while there is room, else on the peer with the most
room. A remote child's prefix goes there by KV transfer (full blocks, on a side thread,
so this replica keeps decoding) or is recomputed there, whichever the cost model says is
cheaper; the peer enters received blocks into its prefix index, so the next child from
the same prefix needs nothing sent. The child runs there as a request of its own and its
result joins here. If the peer dies, the child is started again here.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch

from actors import metrics
from actors.admission import FullRate, StepTimes
from actors.placement import ChildChoice, ChildPlacement
from actors.tasks import task as load_task
from cache_service import OutOfBlocks
from cache_service.transfer import KVTransfer, free_address
from engine.engine import Engine
from engine.forkjoin import ForkJoinEngine
from engine.sampling import SamplingParams
from engine.scheduler import Thread
from engine.threads import ForkJoinOptions, ThreadNode, logprobs_from

REPLICA_METRICS_PORTS = 64  # replicas on one machine, at most, that get a metrics port each
LOAD_REFRESH_S = 0.05  # how often a replica reads its peers' loads
STREAM_BATCH_S = 0.02  # a stream's events go out in batches at most this often (text runs merged)
GAUGES_EVERY_S = 0.5  # how often the KV and queue gauges are set
STALL_S = 30.0  # an engine step running this long is stuck (a hung device or kernel): the replica is not live


@dataclass(slots=True, frozen=True)
class ReplicaLoad:
    replica_id: int
    requests: int  # in flight
    running: int  # threads computing now
    waiting: int  # threads queued for the engine
    free_blocks: int  # KV blocks free or evictable
    total_blocks: int
    step_ms: float  # recent engine step time (moving average)
    step_ms_by_threads: dict[int, float]  # a step's time by the threads it computes (see StepTimes)
    max_step_threads: int  # threads one step computes, at most (0: no cap)
    full_rate: float  # tokens per second over recent full steps (0: none yet; see FullRate)
    stalled: bool  # the engine step running now has run over STALL_S (a hung device or kernel)

    @property
    def threads(self) -> int:
        return self.running + self.waiting


def options_from_dict(raw: dict[str, Any]) -> ForkJoinOptions:
    """ForkJoinOptions from plain JSON fields; unknown fields are an error, not ignored."""
    raw = dict(raw)
    sampling = SamplingParams(**raw.pop("sampling", {}))
    known = set(ForkJoinOptions.__dataclass_fields__) - {"sampling"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return replace(ForkJoinOptions(**raw), sampling=sampling)


class _Stream:
    """What a streamed request's client has been sent; `update` queues what is new."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict] = queue.Queue()
        self.sent_chars = 0
        self.sent_tokens = 0  # of the root's logprobs (when asked for)
        self.status: dict[int, str] = {}

    def update(self, text: str, nodes: list[ThreadNode], logprobs: dict | None = None) -> None:
        """`logprobs`: the root's from token `sent_tokens` on (`logprobs_dict`), which the next
        text event carries."""
        new_tokens = 0 if logprobs is None else len(logprobs["token_ids"])
        if len(text) > self.sent_chars or new_tokens:
            event: dict[str, Any] = {"type": "text", "text": text[self.sent_chars :]}
            if new_tokens:
                event["logprobs"] = logprobs
                self.sent_tokens += new_tokens
            self.events.put(event)
            self.sent_chars = len(text)
        for node in nodes:
            before = self.status.get(node.thread_id)
            if before != node.status and node.parent_id is not None:
                event = "forked" if before is None else node.status
                self.events.put({"type": "thread", "event": event, "thread_id": node.thread_id,
                                 "parent_id": node.parent_id, "depth": node.depth, "spawn": node.spawn})  # fmt: skip
            self.status[node.thread_id] = node.status

    def take(self) -> list[dict]:
        """Every queued event (waiting for the first), runs of text merged into one."""
        events = [self.events.get()]
        while not self.events.empty():
            event = self.events.get_nowait()
            if event["type"] == "text" and events[-1]["type"] == "text":
                events[-1] = merge_text(events[-1], event)
            else:
                events.append(event)
        return events


def merge_text(first: dict, second: dict) -> dict:
    """Two text events in a row as one (their logprobs, if any, in order)."""
    merged = {"type": "text", "text": first["text"] + second["text"]}
    if "logprobs" in first or "logprobs" in second:
        a, b = first.get("logprobs"), second.get("logprobs")
        merged["logprobs"] = {key: (a[key] if a else []) + (b[key] if b else []) for key in (a or b)}
    return merged


class RayRemoteChild:
    """A child running on a peer replica: its result is an object ref."""

    def __init__(self, replica: int, peer: Any, key: str, ref: ray.ObjectRef) -> None:
        self.replica, self.peer, self.key, self.ref = replica, peer, key, ref

    def result(self) -> dict[str, Any] | None:
        ready, _ = ray.wait([self.ref], timeout=0)
        return ray.get(ready[0]) if ready else None  # raises when the peer died

    def cancel(self) -> None:
        self.peer.cancel.remote(self.key)


class ReplicaWorker:
    def __init__(
        self, replica_id: int, model_path: str, device: str = "cpu", kv_cache_bytes: int = 256 * 2**20,
        task: str = "none", capacity: int = 16, torch_threads: int = 0, metrics_port: int | None = None,
        max_step_threads: int | None = None, metrics_host: str = "127.0.0.1", model_name: str | None = None,
        dtype: str | None = None, verifier: str | None = None,
    ) -> None:  # fmt: skip
        """`capacity`: live threads this replica takes before its forks spill to peers;
        `metrics_port`: the first port to try for this process's Prometheus metrics (it takes the
        first free one of REPLICA_METRICS_PORTS; None: not served) on `metrics_host`; `max_step_threads`: threads
        one engine step computes, at most, the most urgent first (None: every live thread);
        `model_name`: the metrics' `model` label (None: the checkpoint folder's name); `dtype`:
        the weights' and KV's (`engine.model.resolve_dtype`; None: the checkpoint's, bf16 on CUDA);
        `task`, `verifier`: names or import paths (`actors.tasks`), loaded here."""
        self.task = load_task(task, verifier)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.replica_id = replica_id
        self.labels = {"model": model_name or Path(model_path).name, "replica": str(replica_id)}
        if metrics_port is not None:
            metrics.serve_metrics(metrics_port, REPLICA_METRICS_PORTS, metrics_host)
        for counter in (metrics.TOKENS, metrics.PREFIX_HITS, metrics.TRANSFER_BYTES, metrics.TRANSFER_SECONDS):
            counter.labels(**self.labels)  # each series exists (at 0) from the start
        for where in ("local", "cached", "transfer", "recompute"):
            metrics.PLACED.labels(**self.labels, where=where)
        self.engine = Engine(
            model_path, device, dtype, kv_cache_bytes=kv_cache_bytes, max_step_threads=max_step_threads
        )
        self.forkjoin = ForkJoinEngine(self.engine, self.task.verifier, self.task.succeeded, self._offload)
        self.step_times = StepTimes()
        self.full_rate = FullRate()
        self.placement = ChildPlacement(replica_id, capacity)
        self.placement.cost.observe_prefill(*self._measure_prefill())
        self.peers: list[Any] = []
        self.peer_loads: dict[int, ReplicaLoad] = {}
        self.transfer: KVTransfer | None = None
        self.placed: dict[str, int] = {"local": 0, "cached": 0, "transfer": 0, "recompute": 0}
        self._keys = itertools.count()
        self._streams: dict[int, _Stream] = {}  # request id -> its stream, for streamed requests
        self._prefix_hits = 0
        self._gauges_at = 0.0
        self._children: dict[str, int] = {}  # key -> request id of a child run here for a peer
        self._requests: dict[str, int] = {}  # key -> request id of a request a caller may cancel
        self._cancelled: set[str] = set()  # keys cancelled before their request or child arrived
        self._send_lock = threading.Lock()  # one outgoing transfer at a time
        self._lock = threading.Lock()  # the engine is stepped by one thread at a time
        self._wake = threading.Event()
        self._done: dict[int, threading.Event] = {}
        self._results: dict[int, dict] = {}
        self._stop = False
        self._step_started: float | None = None  # time.monotonic() when the running engine step began
        self._loop_thread = threading.Thread(target=self._loop, name=f"replica-{replica_id}", daemon=True)
        self._loop_thread.start()
        threading.Thread(target=self._watch_peers, name=f"replica-{replica_id}-peers", daemon=True).start()

    # ---- requests ------------------------------------------------------------------

    def generate(self, prompt: str, options: dict[str, Any] | None = None, key: str | None = None) -> dict:
        """Run one fork-join request to its end; the result as a plain dict. `key`: a name to
        cancel it by (`cancel`), when its caller goes away: its threads stop, their KV is freed."""
        opts = options_from_dict(options or {})
        start = time.perf_counter()
        result = self._run_keyed(self._requests, key, lambda: self.forkjoin.submit(prompt, opts, arrived=start))
        return self._answered(prompt, result, start)

    def generate_stream(self, prompt: str, options: dict[str, Any] | None = None) -> Iterator[dict]:
        """The same request, as events while it runs: `{"type": "text", "text": delta}` for the
        root's new text, `{"type": "thread", ...}` when a thread forks or ends, and last
        `{"type": "result", "result": {...}}`. Closed before its end (its reader was cancelled:
        the client went away), it cancels the request."""
        opts = options_from_dict(options or {})
        start = time.perf_counter()
        stream = _Stream()
        with self._lock:
            request_id = self.forkjoin.submit(prompt, opts, arrived=start)
            self._streams[request_id] = stream
        self._wake.set()
        ended = False
        try:
            while True:
                sent = time.perf_counter()
                for event in stream.take():
                    if event["type"] == "result":
                        ended = True
                        self._answered(prompt, event["result"], start)
                        yield event
                        return
                    yield event
                # At most one batch per STREAM_BATCH_S: a stream is a few dozen messages a second,
                # not one per engine step, whoever reads it and however fast.
                time.sleep(max(0.0, STREAM_BATCH_S - (time.perf_counter() - sent)))
        finally:
            if not ended:  # closed early: its reader was cancelled (Ray closes the generator)
                with self._lock:
                    self.forkjoin.cancel(request_id)
                self._wake.set()

    def _answered(self, prompt: str, result: dict, start: float) -> dict:
        """A request's result with where it ran, its latency and whether its answer is right
        (`accepted`: the task's check; None without one)."""
        accepted = self.task.accepted(prompt, result["text"]) if self.task.accepted else None
        result.update(replica=self.replica_id, latency_s=time.perf_counter() - start, accepted=accepted)
        return result

    def receive_prefix(self, source: int, tag: int) -> int:
        """Receive a peer's prefix KV (its transfer `tag` from rank `source`) into the prefix
        index; the tokens it holds (0: no room to keep them, the children recompute them)."""
        assert self.transfer is not None
        kv, _ = self.transfer.recv(source, tag)
        with self._lock:
            try:
                seq = self.engine.cache.import_blocks(kv)
            except OutOfBlocks:
                return 0
            # Freed at once, the blocks stay in the prefix index, where the children's prefill finds them.
            self.engine.cache.free(seq)
        return len(kv.token_ids)

    def run_child(
        self, key: str, context: list[int], options: dict[str, Any], depth: int, request_prompt: str,
        prefix: int | None = None,
    ) -> dict:  # fmt: skip
        """Run a peer's forked child here. `prefix` is the result of the `receive_prefix` call that
        brought its prefix (the peer passes that call's object ref: Ray starts this one only
        once the prefix is in the index, so no child recomputes a prefix still on its way)."""
        arrived = time.perf_counter()  # its budget counts from here; the parent's join deadline
        # bounds the prefix's way here too (a late child is cut there)
        opts = options_from_dict(options)
        return self._run_keyed(
            self._children, key, lambda: self.forkjoin.submit(context, opts, depth, request_prompt, arrived)
        )

    def cancel(self, key: str) -> None:
        """End the request or child run under `key` (`generate`, `run_child`); one not here yet
        ends as soon as it arrives."""
        with self._lock:
            request_id = self._children.get(key, self._requests.get(key))
            if request_id is not None:
                self.forkjoin.cancel(request_id)
            else:
                self._cancelled.add(key)
        self._wake.set()

    def _run_keyed(self, table: dict[str, int], key: str | None, submit: Callable[[], int]) -> dict:
        """`_run`, with the request known by `key` in `table` while it runs, for `cancel`."""
        if key is None:
            return self._run(submit)

        def keyed() -> int:
            request_id = table[key] = submit()
            if key in self._cancelled:  # cancelled before it arrived: it ends at the next step
                self.forkjoin.cancel(request_id)
            return request_id

        try:
            return self._run(keyed)
        finally:
            table.pop(key, None)
            self._cancelled.discard(key)

    def _run(self, submit: Callable[[], int]) -> dict:
        """Submit a request (under the lock, so its end cannot be missed) and wait for its result."""
        with self._lock:
            request_id = submit()
            done = self._done[request_id] = threading.Event()
        self._wake.set()
        done.wait()
        # No lock here: the loop thread holds it nearly always, and these are single dict
        # operations on entries only this thread still uses.
        del self._done[request_id]
        return self._results.pop(request_id)

    # ---- load and peers ------------------------------------------------------------

    def load(self) -> ReplicaLoad:
        sched = self.engine.scheduler
        cache = self.engine.cache
        cap = sched.max_step_threads
        return ReplicaLoad(
            self.replica_id, len(self._done), len(sched.running), len(sched.waiting),
            cache.num_available_blocks, cache.config.num_blocks, 1000 * self.forkjoin.step_s,
            {n: 1000 * t for n, t in self.step_times.refresh().items()}, 0 if math.isinf(cap) else int(cap),
            self.full_rate.rate(), self._stalled(),
        )  # fmt: skip

    def _stalled(self) -> bool:
        started = self._step_started  # read once: the loop thread clears it
        return started is not None and time.monotonic() - started > STALL_S

    def rendezvous_address(self) -> str:
        """Where the KV process group meets when this replica is rank 0 (it hosts the group's
        store): an address of its own node, a port free there; every rank must reach it."""
        return free_address(ray.util.get_node_ip_address())

    def connect(self, peers: list[Any], init_method: str | None = None) -> None:
        """Know the other replicas (index = replica id = rank); join the KV process group.
        Every replica must call this at once when `init_method` is given (the group forms)."""
        self.peers = peers
        if init_method is not None:
            self.transfer = KVTransfer(self.engine.cache.config, self.replica_id, len(peers), init_method)

    def placement_counts(self) -> dict[str, int]:
        """How this replica's forked children were placed: here, or elsewhere by each prefix path."""
        return dict(self.placed)

    def cached_prefix(self, token_ids: list[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(tokens, K, V) of the longest prefix of `token_ids` this replica's prefix index holds."""
        with self._lock:
            seq = self.engine.cache.allocate(token_ids)
            try:
                kv = self.engine.cache.export_blocks(seq, 0, seq.num_cached_tokens)
            finally:
                self.engine.cache.free(seq)
        return len(kv.token_ids), kv.k, kv.v

    def _watch_peers(self) -> None:
        """Read the peers' loads every LOAD_REFRESH_S (off the loop thread: a dead peer stalls only this)."""
        while not self._stop:
            for i, peer in enumerate(list(self.peers)):
                if i == self.replica_id:
                    continue
                try:
                    load = ReplicaLoad(**ray.get(peer.load_dict.remote(), timeout=1.0))
                except Exception:  # a peer that does not answer takes no children
                    load = None
                if load is None or load.stalled:  # nor does one whose engine is stuck
                    self.peer_loads.pop(i, None)
                else:
                    self.peer_loads[i] = load
            time.sleep(LOAD_REFRESH_S)

    # ---- placing children ----------------------------------------------------------

    def _offload(self, parent: Thread, context: list[int], options: ForkJoinOptions, depth: int) -> Any:
        """ForkJoinEngine's hook (called in a step, the lock held): a child here or on a peer."""
        if len(self.peers) < 2:
            self.placed["local"] += 1
            metrics.PLACED.labels(**self.labels, where="local").inc()
            return None
        config = self.engine.cache.config
        full = parent.seq.num_computed // config.block_size * config.block_size  # whole blocks of the prefix
        prefix_key = zlib.crc32(bytes(str(context[:full]), "ascii"))
        choice = self.placement.choose(
            self.load().threads, {i: load.threads for i, load in self.peer_loads.items()}, self.forkjoin.step_s,
            prefix_key, full, full * config.bytes_per_token, options.max_latency_s,
        )  # fmt: skip
        if choice.prefix == "transfer" and (self.transfer is None or full == 0):
            choice = ChildChoice(choice.replica, "recompute", self.placement.cost.recompute_s(full))
        self.placed[choice.prefix] += 1
        metrics.PLACED.labels(**self.labels, where=choice.prefix).inc()
        if choice.replica is None:
            return None
        peer = self.peers[choice.replica]
        key = f"{self.replica_id}-{next(self._keys)}"
        prefix = choice.ready  # "cached": the transfer that brought it, if any
        if choice.prefix == "transfer":
            tag = next(self._keys)
            kv = self.engine.cache.export_blocks(parent.seq, 0, full)  # a copy: the send needs no lock
            threading.Thread(target=self._send, args=(kv, choice.replica, tag), daemon=True).start()
            prefix = peer.receive_prefix.remote(self.replica_id, tag)
        self.placement.record(choice, prefix_key, prefix)
        options_dict = asdict(options)
        prompt = self.forkjoin.owner[parent.thread_id].prompt  # the request's, for the verifier there
        ref = peer.run_child.remote(key, context, options_dict, depth, prompt, prefix)
        # The peer's load is read again soon; until then count the child there.
        if choice.replica in self.peer_loads:
            load = self.peer_loads[choice.replica]
            self.peer_loads[choice.replica] = replace(load, waiting=load.waiting + 1)
        return RayRemoteChild(choice.replica, peer, key, ref)

    def _send(self, kv: Any, dst: int, tag: int) -> None:
        assert self.transfer is not None
        with self._send_lock:
            try:
                stats = self.transfer.send(kv, dst, tag)
            except RuntimeError:
                return  # the peer went away; its child fails and is started again here
        self.placement.cost.observe_transfer(stats.bytes, stats.seconds)
        metrics.TRANSFER_BYTES.labels(**self.labels).inc(stats.bytes)
        metrics.TRANSFER_SECONDS.labels(**self.labels).inc(stats.seconds)

    def _measure_prefill(self, tokens: int = 256) -> tuple[int, float]:
        """(tokens, seconds) of one prefill here: the first guess of recompute speed (and a warm-up)."""
        vocab = self.engine.runner.model.args.vocab_size
        start = time.perf_counter()
        self.engine.generate([[i % vocab for i in range(tokens)]], SamplingParams(max_new_tokens=1))
        return tokens, time.perf_counter() - start

    # ---- results and metrics -------------------------------------------------------

    def _finished(self, result: dict) -> None:
        request_id = result["request_id"]
        if result["first_token_s"] is not None and request_id not in self._children.values():
            metrics.TTFT.labels(self.labels["model"]).observe(result["first_token_s"])
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.update(result["text"], [], logprobs_from(result["logprobs"], stream.sent_tokens))
            stream.events.put({"type": "result", "result": result})
        else:
            self._results[request_id] = result
            self._done[request_id].set()

    def _record(self, step_s: float) -> None:
        """Per step: tokens and inter-token latency; every GAUGES_EVERY_S: threads, queue, KV."""
        sampled = self.engine.last_step_tokens
        if sampled:
            metrics.TOKENS.labels(**self.labels).inc(sampled)
            itl = metrics.ITL.labels(**self.labels)
            for _ in range(sampled):
                itl.observe(step_s)
        now = time.perf_counter()
        if now - self._gauges_at < GAUGES_EVERY_S:
            return
        self._gauges_at = now
        load = self.load()
        stats = self.engine.cache.stats()
        metrics.LIVE_THREADS.labels(**self.labels).set(load.threads)
        metrics.QUEUE.labels(**self.labels).set(load.waiting)
        metrics.IN_FLIGHT.labels(**self.labels).set(len(self._done) + len(self._streams))
        kinds = {"used": stats.used_blocks, "shared": stats.shared_blocks, "branch": stats.branch_blocks,
                 "cached": stats.cached_blocks, "free": stats.free_blocks}  # fmt: skip
        for kind, value in kinds.items():
            metrics.KV_BLOCKS.labels(**self.labels, kind=kind).set(value)
        metrics.PREFIX_HITS.labels(**self.labels).inc(stats.prefix_hit_tokens - self._prefix_hits)
        self._prefix_hits = stats.prefix_hit_tokens

    # ---- the loop ------------------------------------------------------------------

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._loop_thread.join(timeout=10)

    def _loop(self) -> None:
        try:
            self._steps()
        except Exception:  # a bug: crash the process, so Ray restarts the replica clean
            traceback.print_exc()  # and every request on it is retried elsewhere (the coordinator)
            sys.stderr.flush()
            os._exit(1)

    def _steps(self) -> None:
        while not self._stop:
            with self._lock:
                busy = self.forkjoin.has_work()
                computing = self.engine.has_work()
                if busy:
                    start = time.perf_counter()
                    self._step_started = time.monotonic()
                    finished = self.forkjoin.step()
                    self._step_started = None
                    for stream_id, stream in self._streams.items():
                        if stream_id in self.forkjoin.requests:
                            stream.update(*self.forkjoin.progress(stream_id, stream.sent_tokens))
                    for result in finished:
                        self._finished(result.to_dict())
                    took = time.perf_counter() - start
                    if computing:
                        self.step_times.observe(self.engine.last_step_threads, took)
                        if self.engine.last_step_threads >= self.engine.scheduler.max_step_threads:
                            self.full_rate.observe(self.engine.last_step_tokens, took)
                    self._record(took)
            if not computing:  # idle, or waiting only for children on peers
                self._wake.wait(timeout=0.05 if not busy else 0.002)
                self._wake.clear()
            else:
                time.sleep(0)  # let a thread waiting for the lock (a new request) take it


@ray.remote(max_concurrency=256, max_restarts=3)
class Replica(ReplicaWorker):
    """The Ray actor: one engine per device."""

    def load_dict(self) -> dict:
        return asdict(self.load())

    def memory_bytes(self) -> int:
        """This process's resident memory now (Linux: /proc/self/statm)."""
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def cache_report(self) -> dict:
        """The KV cache checked (`check_integrity()` raises on any inconsistency), and its figures."""
        with self._lock:
            self.engine.cache.check_integrity()
            return asdict(self.engine.cache.stats())
