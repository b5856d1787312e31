"""Fork-join requests on one replica: the model forks, children run together, results join.

Every sampled token's text goes to its thread's protocol parser. A fork pauses the parent
(its KV pinned) and starts one child per spawn, within the request's budgets; a child
ends when it closes its block (or at its token limit, when the protocol closes the block
for it). The join policy decides which children are joined; the protocol writes the
join into the parent — by merging KV (Multiverse) or by text the parent prefills — and
the parent goes on, perhaps to fork again. Children may fork too, up to `max_depth`.

Under a latency budget every thread of a request carries the request's deadline, and the
engine's scheduler runs the threads with the earliest deadline first
(`engine.scheduler.urgency`): a request near its answer is not slowed by new arrivals.

Running out of KV blocks at a fork or a join is not an error: the step is retried after
other threads free blocks; only when nothing at all can run does a request end with
`finish_reason="out_of_blocks"`.

Children may run elsewhere: an `offload` hook (the Ray replica gives one) is asked for
every child of a context-continuing fork whose KV is not merged at the join (ThreadWeaver;
a Multiverse child's KV must be where its parent's is) and may start it on another replica, where it
runs as a request of its own rooted at that child (`submit(..., depth=d)`: it ends when
it closes its block). Its result joins here like a local child's; a remote child whose
replica fails is started again here, from its context.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from typing import Protocol as Interface

from cache_service import OutOfBlocks
from engine.engine import Engine
from engine.protocols import ChildResult, EndEvent, ForkEvent, Parser, Protocol, get_protocol
from engine.scheduler import Thread, ThreadState
from engine.threads import (
    ANSWER_STEPS,
    EARLY_JOIN,
    END_STEPS,
    ForkJoinOptions,
    ForkJoinResult,
    ThreadNode,
    Usage,
    critical_path,
    logprobs_dict,
)


def joinable(result: ChildResult) -> bool:
    """Rejected (by the verifier) and failed (KV lost) children never enter the parent."""
    return result.status in ("done", "truncated")


Verifier = Callable[[str, str], bool]  # (request prompt, child's text) -> whether its claimed result holds
LIVE = (ThreadState.RUNNING, ThreadState.WAITING)
REMOTE_STATUS = {"stop": "done", "length": "truncated", "deadline": "truncated"}  # a remote child's end, as a child


class RemoteChild(Interface):
    """A child running on another replica."""

    replica: int

    def result(self) -> dict[str, Any] | None:
        """Its request's result (`ForkJoinResult.to_dict()`) once finished, else None;
        raises when its replica failed."""

    def cancel(self) -> None: ...


# (parent thread, child's full context token ids, child options, child depth) -> a remote
# child, or None to run it here. Called with the parent settled (its KV covers its tokens).
Offload = Callable[[Thread, list[int], ForkJoinOptions, int], RemoteChild | None]


@dataclass(eq=False)
class _Fork:
    parent: Thread
    fork_id: int
    depth: int  # the parent's depth
    spawns: list[str]
    children: list[Thread | None]  # None until started (and for remote children)
    results: list[ChildResult | None]
    queue: deque[int]  # spawns waiting for a thread slot
    remote: dict[int, int] = field(default_factory=dict)  # index -> node id of a child running elsewhere
    local_only: set[int] = field(default_factory=set)  # indexes whose remote replica failed
    settled: bool = False  # the parent's KV covers all its tokens (needed before children fork off it)
    kept: list[ChildResult] | None = None  # chosen for the join, once decided


@dataclass(eq=False)
class _Request:
    request_id: int
    options: ForkJoinOptions
    protocol: Protocol
    root: Thread
    prompt: str
    clock: Callable[[], float]
    start: float
    threads: dict[int, Thread] = field(default_factory=dict)
    nodes: dict[int, ThreadNode] = field(default_factory=dict)
    parsers: dict[int, Parser] = field(default_factory=dict)
    fork_of: dict[int, _Fork] = field(default_factory=dict)  # child thread id -> its fork
    forks: list[_Fork] = field(default_factory=list)  # open forks
    fork_counts: Counter[int] = field(default_factory=Counter)  # thread id -> forks it made
    generated: int = 0
    first_token_s: float | None = None
    remote: dict[int, RemoteChild] = field(default_factory=dict)  # node id (< 0) -> a child running elsewhere
    finish_reason: str | None = None
    cache_peak: dict[str, int] = field(default_factory=dict)
    deadline_limited: set[int] = field(default_factory=set)  # node ids of children given a deadline's token budget
    deadline_shaped: bool = False  # see `ForkJoinResult.deadline_shaped`

    def now(self) -> float:
        return self.clock() - self.start

    def remote_running(self) -> int:
        return sum(1 for node_id in self.remote if self.nodes[node_id].status == "running")

    def active(self) -> int:
        return sum(1 for t in self.threads.values() if t.state in LIVE) + self.remote_running()


class ForkJoinEngine:
    def __init__(
        self,
        engine: Engine,
        verifier: Verifier | None = None,
        succeeded: Callable[[str], bool] | None = None,
        offload: Offload | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`verifier` rejects a child's wrong claim before the join; `succeeded` says whether a
        child's text claims success (default: the protocol's own marker); `offload` may run
        a child on another replica; `clock` (seconds) times requests and their deadlines."""
        if engine.tokenizer is None:
            raise ValueError("fork-join needs a checkpoint with tokenizer.json: protocols read text")
        self.engine = engine
        self.verifier = verifier
        self.succeeded = succeeded
        self.offload = offload
        self.clock = clock
        self.step_s = 0.0  # recent engine step time (moving average): deadlines and load reports use it
        self.step_peak_s = 0.0  # recent slowest step (a decaying maximum): the margin at a deadline
        self.requests: dict[int, _Request] = {}
        self.owner: dict[int, _Request] = {}  # thread id -> request
        self._ids = itertools.count()
        self._remote_ids = itertools.count(-1, -1)  # remote children's node ids

    def submit(
        self, prompt: str | list[int], options: ForkJoinOptions | None = None, depth: int = 0, request_prompt: str = "",
        arrived: float | None = None,
    ) -> int:  # fmt: skip
        """Start a request. With `depth` > 0 its root is a child of a fork made elsewhere:
        it ends when it closes its block, and `request_prompt` (the original request's
        prompt, for the verifier) is given. `arrived` (this engine's clock; default now) is
        when the request reached its caller: its latency budget counts from then, so time
        spent waiting for a step to end before it could be submitted is not lost."""
        options = options or ForkJoinOptions()
        protocol = get_protocol(options.protocol)
        root = self.engine.add_thread(prompt, options.sampling)
        text = request_prompt or (prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt))
        start = self.clock() if arrived is None else arrived
        req = _Request(next(self._ids), options, protocol, root, text, self.clock, start)
        self._register(req, root, ThreadNode(root.thread_id, None, depth, -1, 0, "", 0.0))
        self.requests[req.request_id] = req
        return req.request_id

    def has_work(self) -> bool:
        return bool(self.requests)

    def progress(self, request_id: int, logprobs_from: int = 0) -> tuple[str, list[ThreadNode], dict | None]:
        """A running request's root text so far, its thread tree and the root's logprobs from
        token `logprobs_from` on (if asked for; see `logprobs_dict`), for streaming: a stream
        asks only for what it has not sent, so a step copies no more than its new tokens."""
        req = self.requests[request_id]
        text = req.root.detokenizer.text if req.root.detokenizer else ""
        return text, list(req.nodes.values()), logprobs_dict(req.root.output_ids, req.root.logprobs, logprobs_from)

    def cancel(self, request_id: int) -> None:
        """End a request now (its threads cancelled, KV freed); the next step returns it."""
        req = self.requests.get(request_id)
        if req is not None and req.finish_reason is None:
            self._finish(req, "cancelled")

    def run(self, prompts: list[str], options: ForkJoinOptions | None = None) -> list[ForkJoinResult]:
        ids = [self.submit(p, options) for p in prompts]
        done: dict[int, ForkJoinResult] = {}
        while len(done) < len(ids):
            done.update((r.request_id, r) for r in self.step())
        return [done[i] for i in ids]

    def step(self) -> list[ForkJoinResult]:
        """One engine step, then every protocol event it caused; returns finished requests."""
        computing, started = self.engine.has_work(), self.clock()
        events = self.engine.step()
        if computing:  # a step with nothing to compute (waiting on remote children) says nothing of step time
            took = self.clock() - started
            self.step_s = 0.8 * self.step_s + 0.2 * took if self.step_s else took
            self.step_peak_s = max(took, 0.95 * self.step_peak_s)
        for event in events:
            req = self.owner.get(event.thread_id)
            if req is None or req.finish_reason is not None:
                continue
            thread = req.threads[event.thread_id]
            node = req.nodes[thread.thread_id]
            if event.token_id is not None:
                node.generated_tokens += 1
                req.generated += 1
                if req.first_token_s is None:
                    req.first_token_s = req.now()
            if event.text and thread.state is ThreadState.RUNNING:
                for pe in req.parsers[thread.thread_id].feed(event.text):
                    if isinstance(pe, ForkEvent) and self._fork(req, thread, pe.spawns):
                        break
                    if isinstance(pe, EndEvent):
                        if thread is req.root:  # a remote child's request: its block is closed
                            self._finish(req, "stop")
                        else:
                            self._child_done(req, thread, "done")
                        break
            if event.finished and node.status == "running":
                if thread is req.root:
                    self._finish(req, event.finish_reason or "stop")
                elif event.finish_reason in ("stop", "length"):
                    ended = event.finish_reason == "stop" and not req.protocol.continues_context
                    self._child_done(req, thread, "done" if ended else "truncated")
                else:  # out of blocks: its KV is gone
                    self._child_done(req, thread, "failed")
            if req.finish_reason is None and req.generated >= req.options.max_total_tokens:
                self._finish(req, "length")
        for req in list(self.requests.values()):
            if req.finish_reason is None and req.options.max_latency_s is not None:
                self._watch_deadline(req)
            if req.finish_reason is None:
                self._poll_remote(req)
                self._advance(req)
        waiting_remote = any(req.remote_running() for req in self.requests.values())
        if not self.engine.has_work() and not waiting_remote:  # nothing can run: what is left can never finish
            for req in self.requests.values():
                if req.finish_reason is None:
                    self._finish(req, "out_of_blocks")
        return [self._collect(req) for req in list(self.requests.values()) if req.finish_reason is not None]

    # ---- forks ----------------------------------------------------------------------

    def _fork(self, req: _Request, parent: Thread, spawns: list[str]) -> bool:
        """Start a fork, or note why not (the parent then goes on alone)."""
        node = req.nodes[parent.thread_id]
        join_at = self._join_at(req, node.depth)
        if join_at is not None and req.now() >= join_at:
            node.notes.append("fork refused: deadline")
            req.deadline_shaped = True
            return False
        if node.depth >= req.options.max_depth:
            node.notes.append(f"fork refused: max_depth {req.options.max_depth}")
            return False
        if not spawns:
            node.notes.append("empty fork: no children")
            return False
        if len(spawns) > req.options.max_fanout:
            node.notes.append(f"fork capped: {len(spawns) - req.options.max_fanout} of {len(spawns)} spawns dropped")
            spawns = spawns[: req.options.max_fanout]
        self.engine.pause(parent)
        fork_id = req.fork_counts[parent.thread_id]
        req.fork_counts[parent.thread_id] += 1
        n = len(spawns)
        fork = _Fork(parent, fork_id, node.depth, spawns, [None] * n, [None] * n, deque(range(n)))
        fork.settled = not req.protocol.continues_context
        req.forks.append(fork)
        self._advance(req)
        if fork.queue:
            node.notes.append(f"fork {fork_id}: {len(fork.queue)} children wait for a thread slot (max_threads)")
        return True

    def _advance(self, req: _Request) -> None:
        """Settle parents, start waiting children within `max_threads`, finish decided joins."""
        for fork in list(req.forks):
            if fork not in req.forks:  # pruned by a join earlier in this pass (its parent is gone)
                continue
            if not fork.settled:
                try:
                    self.engine.settle([fork.parent])
                    fork.settled = True
                except OutOfBlocks:
                    continue
            while fork.queue and req.active() < req.options.max_threads and self._start_child(req, fork):
                pass
            if fork.kept is not None:
                self._join(req, fork)

    def _start_child(self, req: _Request, fork: _Fork) -> bool:
        index = fork.queue[0]
        text = req.protocol.child_prompt(fork.spawns[index], index, fork.depth)
        limit, left_s = req.options.child_max_tokens, None
        join_at = self._join_at(req, fork.depth)
        if join_at is not None:
            left_s = max(join_at - req.now(), 1e-3)
            if self.step_s > 0 and left_s / self.step_s < limit:
                limit = max(1, int(left_s / self.step_s))
        sampling = replace(req.options.sampling, max_new_tokens=limit, logprobs=None)  # the root's alone
        options = replace(req.options, sampling=sampling, max_latency_s=left_s)
        header = self.engine.encode(text)
        remote = None
        # A child may run elsewhere when it continues its parent's context (ThreadWeaver): it is
        # sent the context. Not when its KV is merged into the parent's at the join (Multiverse):
        # that KV must be here. (APR children start fresh: no prefix to move, they stay too.)
        movable = req.protocol.continues_context and not req.protocol.merges_kv
        if self.offload is not None and movable and index not in fork.local_only:
            remote = self.offload(fork.parent, fork.parent.token_ids + header, options, fork.depth + 1)
        if remote is not None:
            thread_id = next(self._remote_ids)
            req.remote[thread_id] = remote
            fork.remote[index] = thread_id
        else:
            try:
                if req.protocol.continues_context:
                    (child,) = self.engine.fork(fork.parent, [header], options.sampling)
                else:
                    child = self.engine.add_thread(text, options.sampling)
            except OutOfBlocks:
                return False
            child.keep_kv = req.protocol.merges_kv
            fork.children[index] = child
            thread_id = child.thread_id
        fork.queue.popleft()
        parent_node = req.nodes[fork.parent.thread_id]
        spawn = fork.spawns[index]
        node = ThreadNode(thread_id, fork.parent.thread_id, fork.depth + 1, fork.fork_id, index, spawn, req.now())
        parent_node.children.append(thread_id)
        req.nodes[thread_id] = node
        if limit < req.options.child_max_tokens:
            node.notes.append(f"token budget {limit}: deadline")
            req.deadline_limited.add(thread_id)
        if remote is not None:
            node.replica = remote.replica
        else:
            self._register(req, child, node)
            req.fork_of[thread_id] = fork
            self._note_cache(req)
        return True

    def _poll_remote(self, req: _Request) -> None:
        """Take in remote children that finished; start again here those whose replica failed."""
        for fork in list(req.forks):
            for index, node_id in list(fork.remote.items()):
                remote, node = req.remote[node_id], req.nodes[node_id]
                if node.status != "running":
                    continue
                try:
                    result = remote.result()
                except Exception as error:  # any failure of the other replica: Ray's errors vary
                    node.status = "failed"
                    node.end_s = req.now()
                    node.notes.append(f"replica {remote.replica} failed ({type(error).__name__}): started again here")
                    del fork.remote[index]
                    fork.local_only.add(index)
                    fork.queue.appendleft(index)
                    req.nodes[fork.parent.thread_id].children.remove(node_id)
                    continue
                if result is None:
                    continue
                usage = result["usage"]
                node.generated_tokens = usage["generated_tokens"]
                node.critical_path_tokens = usage["critical_path_tokens"]
                node.notes.append(f"ran on replica {remote.replica}: {len(result['threads'])} threads")
                req.generated += node.generated_tokens
                status = REMOTE_STATUS.get(result["finish_reason"], "failed")
                req.deadline_shaped |= result["deadline_shaped"]
                self._record(req, fork, node, result["text"], status)

    def _register(self, req: _Request, thread: Thread, node: ThreadNode) -> None:
        budget = req.options.max_latency_s
        thread.deadline = math.inf if budget is None else req.start + budget  # the scheduler runs it by this
        req.threads[thread.thread_id] = thread
        req.nodes[thread.thread_id] = node
        req.parsers[thread.thread_id] = req.protocol.parser(is_child=node.depth > 0)
        self.owner[thread.thread_id] = req

    # ---- children ending, joins -------------------------------------------------------

    def _child_done(self, req: _Request, child: Thread, status: str) -> None:
        fork = req.fork_of[child.thread_id]
        node = req.nodes[child.thread_id]
        if child.state in LIVE:
            if req.protocol.merges_kv:
                self.engine.pause(child)  # its KV joins the parent's
            else:
                self.engine.cancel(child)
        self._record(req, fork, node, child.detokenizer.text if child.detokenizer else "", status)

    def _record(self, req: _Request, fork: _Fork, node: ThreadNode, text: str, status: str) -> None:
        """A child's result: verified, then the join policy decides whether the join is due."""
        node.end_s = req.now()
        if status == "truncated":
            text += req.protocol.closing()
            req.deadline_shaped |= node.thread_id in req.deadline_limited  # cut by its deadline, not its own limit
        succeeded = status != "failed" and (self.succeeded or req.protocol.succeeded)(text)
        if succeeded and self.verifier is not None and not self.verifier(req.prompt, text):
            status, succeeded = "rejected", False
        node.status = status
        result = ChildResult(node.index, node.spawn, text, succeeded, status)
        fork.results[node.index] = result
        if fork.kept is not None:  # the join is decided already (first_success)
            return
        if req.options.join_policy == "first_success" and succeeded:
            fork.kept = [result]
        elif not fork.queue and all(r is not None for r in fork.results):
            fork.kept = self._kept(req, [r for r in fork.results if r is not None])

    def _kept(self, req: _Request, results: list[ChildResult]) -> list[ChildResult]:
        """What a join holds once no child is left to wait for: under `first_success` none
        succeeded, so none (their text would only lengthen the parent's context and cost a
        prefill); under `vote` the majority's; under `all` every one."""
        policy = req.options.join_policy
        if policy == "first_success":
            return []
        return self._vote(req.protocol, results) if policy == "vote" else results

    @staticmethod
    def _vote(protocol: Protocol, results: list[ChildResult]) -> list[ChildResult]:
        answers = [protocol.answer(r.text) for r in results if joinable(r)]
        if not answers:
            return results
        winner = Counter(answers).most_common(1)[0][0]  # ties: the first to appear
        return [r for r in results if joinable(r) and protocol.answer(r.text) == winner]

    def _join(self, req: _Request, fork: _Fork) -> None:
        """Prune the children not kept, write the join into the parent, resume it."""
        kept = fork.kept or []
        kept_ids = {r.index for r in kept}
        for index, child in enumerate(fork.children):
            if child is not None and index not in kept_ids:
                self._prune(req, child)
        for index, node_id in fork.remote.items():
            if index not in kept_ids:
                self._prune_remote(req, node_id)
        if fork.queue:
            req.nodes[fork.parent.thread_id].notes.append(f"fork {fork.fork_id}: {len(fork.queue)} never started")
            fork.queue.clear()
        merged = [r for r in kept if joinable(r)] if req.protocol.merges_kv else []
        if merged:
            children = [fork.children[r.index] for r in merged]
            closings = [self.engine.encode(req.protocol.closing()) if r.status == "truncated" else [] for r in merged]
            try:
                self.engine.settle(children, closings)
            except OutOfBlocks:
                return  # retried next step
            self._note_cache(req)
            self.engine.merge(fork.parent, children)
        for r in kept:
            node = self._child_node(req, fork, r.index)
            if joinable(r):
                if r.status == "truncated":
                    node.notes.append("truncated")
                node.status = "joined"
        depth = req.nodes[fork.parent.thread_id].depth
        join = self.engine.encode(req.protocol.join_text(sorted(kept, key=lambda r: r.index), depth))
        self.engine.resume(fork.parent, join)
        req.forks.remove(fork)

    def _prune(self, req: _Request, thread: Thread) -> None:
        """Cancel a thread not joined, free its KV, and prune every fork still open below it."""
        if thread.state in LIVE or thread.state is ThreadState.PAUSED:
            self.engine.cancel(thread)
        self.engine.release(thread)
        node = req.nodes[thread.thread_id]
        if node.status not in ("rejected", "failed"):
            node.status = "pruned"
        node.end_s = node.end_s or req.now()
        for fork in [f for f in req.forks if f.parent is thread]:
            req.forks.remove(fork)
            for child in fork.children:
                if child is not None:
                    self._prune(req, child)
            for node_id in fork.remote.values():
                self._prune_remote(req, node_id)

    def _prune_remote(self, req: _Request, node_id: int) -> None:
        node = req.nodes[node_id]
        if node.status == "running":
            req.remote[node_id].cancel()
            node.status = "pruned"
            node.end_s = req.now()
        elif node.status not in ("rejected", "failed"):
            node.status = "pruned"

    @staticmethod
    def _child_node(req: _Request, fork: _Fork, index: int) -> ThreadNode:
        child = fork.children[index]
        return req.nodes[child.thread_id if child is not None else fork.remote[index]]

    def _join_at(self, req: _Request, depth: int) -> float | None:
        """When the open forks of threads at `depth` must join (seconds since the request's
        start), or None without a budget: so that each thread above still has ANSWER_STEPS
        to conclude, and the root END_STEPS of margin (see `ForkJoinOptions`)."""
        budget = req.options.max_latency_s
        if budget is None:
            return None
        root = min(EARLY_JOIN * budget, budget - (ANSWER_STEPS + END_STEPS) * self.step_s)
        return root - ANSWER_STEPS * depth * self.step_s

    def _watch_deadline(self, req: _Request) -> None:
        """End the request END_STEPS (and one slow step) before its budget; join each fork due,
        with its running children cut where they are (joined "truncated"), waiting ones dropped."""
        if req.now() + END_STEPS * self.step_s + self.step_peak_s >= (req.options.max_latency_s or 0.0):
            req.deadline_shaped = True
            self._finish(req, "deadline")
            return
        for fork in list(req.forks):
            if fork.kept is not None or req.now() < (self._join_at(req, fork.depth) or 0.0):
                continue
            fork.queue.clear()
            for index, child in enumerate(fork.children):
                if child is not None and fork.results[index] is None and child.state in LIVE:
                    self._child_done(req, child, "truncated")
            if fork.kept is None:  # (first_success may have decided it just now)
                fork.kept = self._kept(req, [r for r in fork.results if r is not None])
            req.nodes[fork.parent.thread_id].notes.append(f"fork {fork.fork_id}: early join: deadline")
            req.deadline_shaped = True

    # ---- the request's end -----------------------------------------------------------

    def _finish(self, req: _Request, reason: str) -> None:
        req.finish_reason = reason
        for node_id, remote in req.remote.items():
            if req.nodes[node_id].status == "running":
                remote.cancel()
                req.nodes[node_id].status = "cancelled"
                req.nodes[node_id].end_s = req.now()
        for thread in req.threads.values():
            node = req.nodes[thread.thread_id]
            cut_short = thread.state is not ThreadState.FINISHED and node.status == "running"
            if thread.state is not ThreadState.FINISHED:
                self.engine.cancel(thread)  # a joined child is paused with no KV: this only retires it
            self.engine.release(thread)
            if node.status == "running":
                node.status = "truncated" if cut_short else "done"
            node.end_s = node.end_s if node.end_s is not None else req.now()

    def _collect(self, req: _Request) -> ForkJoinResult:
        del self.requests[req.request_id]
        for thread_id in req.threads:
            self.owner.pop(thread_id, None)
        generated = sum(n.generated_tokens for n in req.nodes.values())
        prompt = req.root.num_prompt_tokens
        usage = Usage(prompt, generated, prompt + generated, critical_path(req.nodes, req.root.thread_id))
        return ForkJoinResult(
            request_id=req.request_id,
            text=req.root.detokenizer.text if req.root.detokenizer else "",
            finish_reason=req.finish_reason or "",
            threads=sorted(req.nodes.values(), key=lambda n: n.thread_id),
            usage=usage,
            cache=dict(req.cache_peak),
            first_token_s=req.first_token_s,
            logprobs=logprobs_dict(req.root.output_ids, req.root.logprobs),
            deadline_shaped=req.deadline_shaped,
        )

    def _note_cache(self, req: _Request) -> None:
        """Peak KV figures, sampled at forks and joins (when sharing is at its height)."""
        stats = self.engine.cache.stats()
        now = {
            "used_blocks": stats.used_blocks,
            "shared_blocks": stats.shared_blocks,
            "branch_blocks": stats.branch_blocks,
            "used_bytes": stats.used_bytes,
            "shared_bytes": stats.shared_bytes,
        }
        for key, value in now.items():
            req.cache_peak[key] = max(req.cache_peak.get(key, 0), value)
