"""Continuous batching over threads: which tokens of which threads run in the next step.

Plain bookkeeping over the KV cache, no tensors. A thread is WAITING (no KV: new, or
preempted and to be recomputed from its tokens), RUNNING (scheduled each step while it
has tokens to compute, within `max_step_threads`), PAUSED (KV kept, not scheduled) or FINISHED (KV freed).

Each step takes the running threads' uncomputed tokens (one for a decode, more after a
resume or for a prefill, chunked to the token budget), most urgent thread first, then
admits waiting threads while the budget and the pool allow. `urgency` is the one place
that ranks threads: earliest deadline first (a thread's deadline is its request's; see
`engine.forkjoin`), then oldest; threads without a deadline come after every thread
with one, oldest first, as they would with no deadlines at all. With `max_step_threads`
a step takes at most that many threads, so under load the most urgent ones run at full
speed instead of every thread slowing down together. When a running thread needs a
block and none is left, the least urgent running thread is preempted: its KV is freed
and it waits to be recomputed (its prefix is often still in the prefix index).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

from cache_service import KVCache, Sequence
from engine.detokenizer import IncrementalDetokenizer
from engine.model_runner import Chunk
from engine.sampling import SamplingParams, TokenLogprob


class ThreadState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Thread:
    thread_id: int
    token_ids: list[int]  # everything the thread's context holds: prompt, generated, inserted
    num_prompt_tokens: int
    sampling: SamplingParams
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer | None
    seq: Sequence | None = None
    state: ThreadState = ThreadState.WAITING
    num_generated: int = 0
    finish_reason: str | None = None  # "stop", "length", "cancelled", "out_of_blocks"
    num_preemptions: int = 0
    output_ids: list[int] = field(default_factory=list)  # generated and inserted tokens
    keep_kv: bool = False  # on finish keep the sequence (a join will merge it); Engine.release frees it
    deadline: float = math.inf  # when its request must have answered (the fork-join clock); inf: no budget
    logprobs: list[TokenLogprob] | None = None  # one per output token, when its sampling asks (`logprobs`)

    def insert(self, token_ids: list[int]) -> None:
        """Add tokens the thread did not sample (a join's text, a child's path) to its context."""
        self.token_ids.extend(token_ids)
        self.output_ids.extend(token_ids)
        if self.logprobs is not None:
            self.logprobs.extend(TokenLogprob(None) for _ in token_ids)
        if self.detokenizer is not None:
            self.detokenizer.add(list(token_ids))

    @property
    def pending(self) -> list[int]:
        """Tokens the thread holds that its sequence has no slot for yet."""
        return self.token_ids[len(self.seq) :] if self.seq is not None else self.token_ids


def urgency(thread: Thread) -> tuple[float, int]:
    """The rank of a thread in a step: earliest deadline first, then oldest (ids grow with age)."""
    return thread.deadline, thread.thread_id


class Scheduler:
    def __init__(
        self, cache: KVCache, max_num_batched_tokens: int, max_num_seqs: int, max_step_threads: int | None = None
    ) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1 or (max_step_threads or 1) < 1:
            raise ValueError("max_num_batched_tokens, max_num_seqs and max_step_threads must be >= 1")
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_step_threads = max_step_threads or math.inf  # threads one step computes, at most
        self.waiting: deque[Thread] = deque()
        self.running: list[Thread] = []  # most urgent first (sorted at each step)
        self.paused: dict[int, Thread] = {}
        self.failed: list[Thread] = []  # ended by the scheduler since the last drain_failed()
        self._ids = itertools.count()

    def new_thread_id(self) -> int:
        return next(self._ids)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- thread transitions ------------------------------------------------------

    def add(self, thread: Thread) -> None:
        """Queue a thread; if it already holds a sequence (a fork child) it runs at once."""
        if thread.seq is None:
            thread.state = ThreadState.WAITING
            self.waiting.append(thread)
        else:
            thread.state = ThreadState.RUNNING
            self.running.append(thread)

    def pause(self, thread: Thread) -> None:
        """Stop scheduling the thread; its KV stays pinned."""
        self._detach(thread)
        thread.state = ThreadState.PAUSED
        self.paused[thread.thread_id] = thread

    def resume(self, thread: Thread, extra_token_ids: list[int]) -> None:
        """Schedule a paused thread again, with tokens to prefill before it decodes on."""
        if thread.state is not ThreadState.PAUSED:
            raise ValueError(f"thread {thread.thread_id} is {thread.state.value}, not paused")
        del self.paused[thread.thread_id]
        thread.insert(extra_token_ids)
        self.add(thread)

    def finish(self, thread: Thread, reason: str) -> None:
        """End the thread (done, cancelled or failed) and free its KV, unless `keep_kv`."""
        self._detach(thread)
        self.paused.pop(thread.thread_id, None)
        if thread.seq is not None and not (thread.keep_kv and reason in ("stop", "length")):
            self.release(thread)
        thread.state = ThreadState.FINISHED
        thread.finish_reason = reason

    def release(self, thread: Thread) -> None:
        """Free a thread's KV."""
        if thread.seq is not None:
            self.cache.free(thread.seq)
            thread.seq = None

    # ---- one step ------------------------------------------------------------------

    def schedule(self) -> tuple[list[Chunk], list[Thread]]:
        """The next step's chunks and their threads (same order); may preempt or admit.

        Running and waiting threads are taken together, most urgent first: a waiting thread
        is admitted (given KV) when the pool has room, and once one cannot be, no less urgent
        one jumps ahead of it."""
        chunks: list[Chunk] = []
        threads: list[Thread] = []
        budget = self.max_num_batched_tokens
        self.running.sort(key=urgency)
        admitting = True
        for thread in sorted([*self.running, *self.waiting], key=urgency):
            if budget == 0 or len(threads) >= self.max_step_threads:
                break
            if thread.state is ThreadState.WAITING:
                admitting = admitting and self._admit(thread)
                if not admitting:
                    continue
            elif thread.state is not ThreadState.RUNNING or not self._give_slots(thread):
                continue
            take = min(len(thread.seq) - thread.seq.num_computed, budget)
            if take:
                chunks.append(Chunk(thread.seq, take))
                threads.append(thread)
                budget -= take
        if not chunks:
            self._fail_if_stuck()
        return chunks, threads

    def _admit(self, thread: Thread) -> bool:
        """Give a waiting thread its KV (prefix-index hits included) and run it, if there is room."""
        # Leave a block of headroom per running thread so admitting does not force a preemption.
        headroom = len(self.running)
        full = len(self.running) >= self.max_num_seqs
        if full or self.cache.blocks_for(len(thread.token_ids)) + headroom > self.cache.num_available_blocks:
            return False
        self.waiting.remove(thread)
        thread.seq = self.cache.allocate(thread.token_ids)
        thread.state = ThreadState.RUNNING
        # In urgency order: the threads after one in `running` are the ones a step has not
        # scheduled yet, the only victims `_give_slots` may preempt.
        bisect.insort(self.running, thread, key=urgency)
        return True

    def _give_slots(self, thread: Thread) -> bool:
        """Append the thread's pending tokens to its sequence, preempting if the pool is short.

        Victims are less urgent running threads (not yet scheduled this step), least first;
        with none left the thread preempts itself. Only standard-layout sequences can be
        recomputed from their tokens, so a merged one is never a victim: it just waits.
        """
        pending = thread.pending
        index = self.running.index(thread)
        while not self.cache.can_append(thread.seq, len(pending)):
            later = [t for t in self.running[index + 1 :] if t.seq.standard_layout]
            if later:
                self._preempt(later[-1])
                continue
            if thread.seq.standard_layout:
                self._preempt(thread)
            return False
        self.cache.append(thread.seq, pending)
        return True

    def _preempt(self, thread: Thread) -> None:
        self.running.remove(thread)
        self.cache.free(thread.seq)
        thread.seq = None
        thread.state = ThreadState.WAITING
        thread.num_preemptions += 1
        self.waiting.appendleft(thread)

    def _fail_if_stuck(self) -> None:
        """Nothing could run: the pool is too small for what waits. Fail rather than hang."""
        stuck = self.running[-1] if self.running else (self.waiting[0] if self.waiting else None)
        if stuck is not None:
            self.finish(stuck, "out_of_blocks")
            self.failed.append(stuck)

    def drain_failed(self) -> list[Thread]:
        failed, self.failed = self.failed, []
        return failed

    def _detach(self, thread: Thread) -> None:
        if thread in self.running:
            self.running.remove(thread)
        elif thread in self.waiting:
            self.waiting.remove(thread)
