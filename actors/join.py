"""The join across samples: a request's n samples, spread over replicas, joined into its answer.

Within a request the join stays in the parent's replica, which holds the parent's KV
(docs/cluster.md). What a separate actor is for is aggregation *across* replicas: OpenAI's
`n`, self-consistency (the APR paper's cons@n), verifier-guided best-of-n. The ingress
starts a `Join` actor for every request with several samples (n > 1, or several prompts)
and kills it when the request ends; it is owned by the ingress, so it also dies with it.

Each sample is a request of its own to the coordinator, which places it by load (with a
budget, where it is predicted to finish soonest: the samples spread over replicas). Sample
j of a prompt gets the request's seed + j. How the samples become the answer
(`sample_join`, per prompt):
- "all": every sample is a choice (OpenAI's `n`), in order;
- "vote": one choice, the sample whose final answer (the task's `answer`) most samples
  reached; ties go to an answer the verifier accepts, then to the earliest sample;
- "first_success": one choice, the first sample the verifier accepts; the prompt's other
  samples are cancelled on their replicas at once. None accepted: the vote of those that
  finished.
A request with a latency budget is answered by its end (plus JOIN_GRACE_S, in which the
samples the engine cut at the deadline report): samples still running are cancelled and
each prompt gets the best answer so far. A sample whose replica dies before it answers runs
again on another (the coordinator's retry: `Coordinator.outcome`, admitted then result);
streamed "all" samples stream their text (`Coordinator.stream`), and one that has sent
text ends with an error event instead, as a single request does.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import FIRST_COMPLETED
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray

from actors.outcomes import RequestTimedOut, next_event, time_limit_s
from actors.tasks import Task
from actors.tasks import task as load_task

SAMPLE_JOINS = ("all", "vote", "first_success")
JOIN_GRACE_S = 1.0  # past a budget's end, how long the samples cut at the deadline have to report
ADMIT_TIMEOUT_S = 60.0  # the coordinator admits or refuses each sample within this


@dataclass(slots=True)
class Sample:
    prompt: int  # which of the request's prompts it answers
    result: dict | None = None  # the coordinator's result once it finished
    answer: str | None = None  # its final answer, as votes compare it
    accepted: bool | None = None  # the verifier's verdict (None: no verifier)
    finished_at: int | None = None  # its place in the order samples finished
    cancelled: bool = False
    error: BaseException | None = None


class Samples:
    """The decisions of one multi-sample request, as a plain class: which samples a finished
    one makes unnecessary, when the answer is decided, and what it is."""

    def __init__(self, prompts: list[str], n: int, policy: str, task: Task) -> None:
        if policy not in SAMPLE_JOINS:
            raise ValueError(f"unknown sample_join {policy!r}; known: {', '.join(SAMPLE_JOINS)}")
        if policy == "first_success" and task.accepted is None:
            raise ValueError("sample_join first_success needs a verifier (serve with --verifier module:function)")
        self.prompts, self.n, self.policy, self.task = prompts, n, policy, task
        self.items = [Sample(i // n) for i in range(len(prompts) * n)]
        self._finished = 0

    def group(self, prompt: int) -> range:
        return range(prompt * self.n, (prompt + 1) * self.n)

    def finished(self, index: int, result: dict) -> list[int]:
        """Record sample `index`'s result; the samples it makes unnecessary (to cancel)."""
        sample = self.items[index]
        sample.result, sample.finished_at = result, self._finished
        sample.cancelled = False  # a cancel sent while its result was on its way: it ran to the end
        self._finished += 1
        sample.answer = self.task.answer(result["text"])
        if self.task.accepted is not None:
            sample.accepted = bool(self.task.accepted(self.prompts[sample.prompt], result["text"]))
        if self.policy == "first_success" and sample.accepted:
            return [j for j in self.group(sample.prompt) if not self._ended(j)]
        return []

    def failed(self, index: int, error: BaseException) -> None:
        self.items[index].error = error

    def cancelled(self, index: int) -> None:
        self.items[index].cancelled = True

    def _ended(self, index: int) -> bool:
        sample = self.items[index]
        return sample.result is not None or sample.cancelled or sample.error is not None

    def decided(self) -> bool:
        """Whether every prompt's answer is known: all its samples ended, or (first_success)
        one was accepted."""
        return all(
            all(self._ended(j) for j in self.group(p))
            or (self.policy == "first_success" and self._first_accepted(p) is not None)
            for p in range(len(self.prompts))
        )

    def _first_accepted(self, prompt: int) -> int | None:
        accepted = [j for j in self.group(prompt) if self.items[j].accepted]
        return min(accepted, key=lambda j: self.items[j].finished_at, default=None)

    def winner(self, prompt: int) -> int | None:
        """The sample that answers `prompt` (vote, first_success); None when none finished."""
        finished = [j for j in self.group(prompt) if self.items[j].result is not None]
        if not finished:
            return None
        first = self._first_accepted(prompt) if self.policy == "first_success" else None
        if first is not None:
            return first
        votes = Counter(self.items[j].answer for j in finished)
        # Most votes, then an accepted answer, then the earliest sample.
        return min(finished, key=lambda j: (-votes[self.items[j].answer], not self.items[j].accepted, j))

    def agreement(self, prompt: int) -> float | None:
        """The share of a prompt's finished samples that reached its winner's answer."""
        winner = self.winner(prompt)
        finished = [j for j in self.group(prompt) if self.items[j].result is not None]
        if winner is None:
            return None
        return sum(self.items[j].answer == self.items[winner].answer for j in finished) / len(finished)

    def answer(self) -> dict:
        """{"results": a result per choice, "stats": for the metrics}. "all": every sample's
        result (the first failure raised); else each prompt's winner, its `usage` counting
        every sample's tokens and `samples` saying how each went."""
        if self.policy == "all":
            for sample in self.items:
                if sample.result is None:
                    raise sample.error or RequestTimedOut("a sample did not finish within the request's time")
            return {"results": [s.result for s in self.items], "stats": self.stats()}
        results = []
        for prompt in range(len(self.prompts)):
            winner = self.winner(prompt)
            if winner is None:
                errors = [self.items[j].error for j in self.group(prompt) if self.items[j].error is not None]
                raise errors[0] if errors else RequestTimedOut(f"no sample of prompt {prompt} finished in time")
            result = dict(self.items[winner].result)
            ran = [self.items[j].result for j in self.group(prompt) if self.items[j].result is not None]
            generated = sum(r["usage"]["generated_tokens"] for r in ran)
            result["usage"] = {**result["usage"], "generated_tokens": generated,
                               "total_tokens": result["usage"]["prompt_tokens"] + generated}  # fmt: skip
            result["samples"] = [self._summary(j, winner) for j in self.group(prompt)]
            results.append(result)
        return {"results": results, "stats": self.stats()}

    def _summary(self, index: int, winner: int) -> dict:
        sample = self.items[index]
        result = sample.result or {}
        status = "finished" if sample.result else "cancelled" if sample.cancelled else "failed"
        return {"status": status, "chosen": index == winner, "answer": sample.answer, "accepted": sample.accepted,
                "replica": result.get("replica"), "latency_s": result.get("latency_s"),
                "finish_reason": result.get("finish_reason")}  # fmt: skip

    def stats(self) -> dict:
        """Samples, the vote's agreement per prompt, verifier rejects, time to the first accepted
        sample (from the request's arrival), samples cancelled: the ingress records them."""
        accepted = [s.result["latency_s"] for s in self.items if s.accepted]
        agreements = [self.agreement(p) for p in range(len(self.prompts))] if self.policy != "all" else []
        return {
            "samples": len(self.items),
            "agreement": [a for a in agreements if a is not None],
            "rejects": sum(s.accepted is False for s in self.items),
            "first_success_s": min(accepted) if accepted and self.policy == "first_success" else None,
            "cancelled": sum(s.cancelled for s in self.items),
            "replicas": sorted({s.result["replica"] for s in self.items if s.result}),
        }


def sample_options(options: dict[str, Any], j: int) -> dict[str, Any]:
    """Sample j's options: with a seed, its own (seed + j)."""
    seed = options.get("sampling", {}).get("seed")
    return options if seed is None else {**options, "sampling": {**options["sampling"], "seed": seed + j}}


async def merged(streams: list[Any], end: float) -> AsyncIterator[tuple[int, dict]]:
    """(index, event) from several coordinator streams as they come, each stream's in order;
    TimeoutError at `end` (time.time())."""
    pending = {asyncio.ensure_future(next_event(stream)): i for i, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, timeout=end - time.time(), return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TimeoutError
            for task in done:
                index = pending.pop(task)
                event = task.result()
                if event is not None:
                    pending[asyncio.ensure_future(next_event(streams[index]))] = index
                    yield index, event
    finally:
        for task in pending:
            task.cancel()


@ray.remote(num_cpus=0)
class Join:
    """One multi-sample request (see the module docstring): `run` answers it whole, `stream`
    streams it (call one, once)."""

    def __init__(self, coordinator: Any, task: str, verifier: str | None, request_timeout_s: float) -> None:
        self.coordinator = coordinator
        self.task = load_task(task, verifier)
        self.request_timeout_s = request_timeout_s
        self.streams: list[Any] = []  # each sample's coordinator stream

    async def run(self, prompts: list[str], options: dict, n: int, policy: str, received: float) -> dict:
        """{"results": a result per choice, "stats": ...} (see `Samples.answer`)."""
        samples = Samples(prompts, n, policy, self.task)
        await self._admit(prompts, options, n, received, self.coordinator.outcome)
        async for _ in self._join(samples, options, received):
            pass
        return samples.answer()

    async def stream(
        self, prompts: list[str], options: dict, n: int, policy: str, received: float
    ) -> AsyncIterator[dict]:
        """Events as a coordinator stream's, each with the `index` of its choice: first
        "admitted" (a refusal raises before it); "all" streams every sample's events as they
        come; "vote" and "first_success" send a "sample" event as each sample finishes, then
        each prompt's winner as one "text" and its "result"."""
        samples = Samples(prompts, n, policy, self.task)
        method = self.coordinator.stream if policy == "all" else self.coordinator.outcome
        await self._admit(prompts, options, n, received, method)
        yield {"type": "admitted", "index": 0}
        if policy == "all":
            try:
                async for index, event in merged(self.streams, self._end(options, received)):
                    if event["type"] == "result":
                        samples.finished(index, event["result"])
                    yield {**event, "index": index}
            finally:
                self._cancel(range(len(self.streams)), samples)
        else:
            async for index in self._join(samples, options, received):
                sample = samples.items[index]
                yield {"type": "sample", "event": "sample", "index": sample.prompt, "sample": index % n,
                       "answer": sample.answer, "accepted": sample.accepted,
                       "replica": sample.result["replica"]}  # fmt: skip
            for prompt, result in enumerate(samples.answer()["results"]):
                yield {"type": "text", "index": prompt, "text": result["text"], "logprobs": result.get("logprobs")}
                yield {"type": "result", "index": prompt, "result": result}
        yield {"type": "stats", "index": 0, "stats": samples.stats(), "policy": policy}

    async def close(self) -> None:
        """Cancel every sample still running (the ingress calls this before it kills the actor)."""
        for stream in self.streams:
            ray.cancel(stream)

    async def _admit(self, prompts: list[str], options: dict, n: int, received: float, method: Any) -> None:
        """Start every sample as a coordinator stream (`method`: `stream` or `outcome`) and wait
        until each is admitted; a refusal (or a failure) of any cancels the rest and raises."""
        self.streams = [
            method.remote(prompt, sample_options(options, j), received, spread=True)
            for prompt in prompts
            for j in range(n)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*[next_event(s) for s in self.streams]), ADMIT_TIMEOUT_S)
        except BaseException:
            for stream in self.streams:
                ray.cancel(stream)
            raise

    async def _join(self, samples: Samples, options: dict, received: float) -> AsyncIterator[int]:
        """Gather the samples until the answer is decided or the time is up (then cancel the
        rest); yields each sample as it finishes."""
        tasks = {asyncio.ensure_future(next_event(stream)): i for i, stream in enumerate(self.streams)}
        end = self._end(options, received)
        pending = set(tasks)
        try:
            while pending and not samples.decided():
                done, pending = await asyncio.wait(pending, timeout=end - time.time(), return_when=FIRST_COMPLETED)
                if not done:
                    break  # the budget (or the time limit) is spent: answer with what finished
                for task in done:
                    index = tasks[task]
                    try:
                        unneeded = samples.finished(index, task.result()["result"])
                    except Exception as error:  # a sample's failure is recorded: a vote goes on without it
                        samples.failed(index, error)
                        if samples.policy == "all":
                            raise
                        continue
                    yield index
                    self._cancel(unneeded, samples)
        finally:
            left = [i for task, i in tasks.items() if not task.done()]
            self._cancel(left, samples)
            for task in tasks:
                task.cancel()

    def _cancel(self, indices: Any, samples: Samples) -> None:
        """End these samples on their replicas (the coordinator cancels them there)."""
        for i in indices:
            ray.cancel(self.streams[i])
            if samples.items[i].result is None:
                samples.cancelled(i)

    def _end(self, options: dict, received: float) -> float:
        """When the samples' time is up (time.time()): a budget's end plus JOIN_GRACE_S, else the
        request's time limit."""
        budget = options.get("max_latency_s")
        limit = time_limit_s(options, self.request_timeout_s)
        return received + (limit if budget is None else min(limit, budget + JOIN_GRACE_S))
