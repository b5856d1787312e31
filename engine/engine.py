"""One replica's engine: schedule, run, sample — many threads at once, no Ray needed.

    engine = Engine("path/to/checkpoint")
    outputs = engine.generate(["12 34 +"], SamplingParams(max_new_tokens=32))

The thread-level calls (`add_thread`, `pause`, `resume`, `cancel`, `step`) are what the
fork-join layer drives: `step()` runs one batched forward over every live thread and
returns one event per sampled token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from cache_service import OutOfBlocks
from engine.detokenizer import IncrementalDetokenizer
from engine.model_runner import Chunk, ModelRunner
from engine.sampling import SamplingParams, TokenLogprob, sample, token_logprobs
from engine.scheduler import Scheduler, Thread, ThreadState


@dataclass(slots=True, frozen=True)
class StepEvent:
    thread_id: int
    token_id: int | None  # None when the thread ended without sampling (cancelled, out of blocks)
    text: str  # new text of this thread since the last event
    finish_reason: str | None  # set on the thread's last event

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True, frozen=True)
class GenerationOutput:
    thread_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated (and inserted) tokens
    text: str
    finish_reason: str
    num_preemptions: int
    logprobs: list[TokenLogprob] | None = None  # one per token of `token_ids`, when asked for


class Engine:
    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,  # None: the checkpoint's (bf16 for fp32 ones on CUDA)
        kv_cache_bytes: int = 512 * 2**20,
        block_size: int = 16,
        max_num_batched_tokens: int = 1024,
        max_num_seqs: int = 256,
        max_step_threads: int | None = None,
        seed: int = 0,
        logits_processor: Callable[[list[Thread], torch.Tensor], torch.Tensor] | None = None,
        fused_decode: bool = True,
        attention: str | None = None,
    ) -> None:
        path = Path(model_path)
        self.runner = ModelRunner(path, device, dtype, kv_cache_bytes, block_size, fused_decode, attention)
        self.cache = self.runner.cache
        self.scheduler = Scheduler(self.cache, max_num_batched_tokens, max_num_seqs, max_step_threads)
        tokenizer_file = path / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.exists() else None
        self.eos_token_ids = set(self.runner.model.args.eos_token_ids) | _generation_eos(path)
        self.max_context = self.runner.model.args.max_context
        self.threads: dict[int, Thread] = {}
        self._seeds = random.Random(seed)
        # Rewrites a step's logits (B, vocab) for its sampling threads; tests force scripts with it.
        self.logits_processor = logits_processor
        self.last_step_tokens = 0  # tokens sampled by the last step
        self.last_step_threads = 0  # threads computed in the last step

    # ---- threads -------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids, not text")
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return list(prompt)

    def add_thread(self, prompt: str | list[int], sampling: SamplingParams | None = None) -> Thread:
        """Queue a new root thread; it is prefilled in a coming step."""
        token_ids = self.encode(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.runner.model.args.vocab_size
        if not all(0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; the model's context is {self.max_context}")
        thread = self._new_thread(token_ids, sampling or SamplingParams())
        self.scheduler.add(thread)
        return thread

    def fork(
        self, parent: Thread, child_token_ids: list[list[int]], sampling: SamplingParams | None = None
    ) -> list[Thread]:
        """Pause `parent` and start one child per entry, each continuing the parent's context
        followed by its own extra tokens (e.g. a path header).

        Children share the parent's computed KV through the cache's fork (full blocks
        shared, the partial tail copied once each); the parent's last sampled token and
        each child's extra tokens are prefilled by the child.
        """
        if parent.seq is None or parent.seq.num_computed != len(parent.seq):
            raise ValueError(f"thread {parent.thread_id} has no fully computed KV to fork from")
        seqs = self.cache.fork(parent.seq, len(child_token_ids))  # OutOfBlocks before any change
        if parent.state is not ThreadState.PAUSED:
            self.pause(parent)
        children = []
        for seq, extra in zip(seqs, child_token_ids, strict=True):
            child = self._new_thread(parent.token_ids + list(extra), sampling or parent.sampling)
            child.seq = seq
            self.scheduler.add(child)
            children.append(child)
        return children

    def pause(self, thread: Thread) -> None:
        self.scheduler.pause(thread)

    def settle(self, threads: list[Thread], extra_token_ids: list[list[int]] | None = None) -> None:
        """Write the KV of every token the (paused or kept) threads hold, plus extra tokens,
        in one forward and without sampling: a fork or a merge needs all of it.

        Raises OutOfBlocks (changing nothing) when the pool cannot take the tokens.
        """
        extras = extra_token_ids or [[] for _ in threads]
        if any(t.seq is None or t.state is ThreadState.RUNNING for t in threads):
            raise ValueError("settle needs threads that hold KV and are not running")
        needed = sum(self.cache.blocks_for(len(t.pending) + len(e)) for t, e in zip(threads, extras, strict=True))
        if needed > self.cache.num_available_blocks:
            raise OutOfBlocks(needed, self.cache.num_available_blocks)
        for thread, extra in zip(threads, extras, strict=True):
            thread.insert(extra)
            self.cache.append(thread.seq, thread.pending)
        chunks = [Chunk(t.seq, len(t.seq) - t.seq.num_computed) for t in threads if t.seq.num_computed < len(t.seq)]
        if chunks:
            self.runner.forward(chunks)

    def merge(self, parent: Thread, children: list[Thread]) -> None:
        """Multiverse join: the parent's sequence becomes parent + each child's own tokens,
        by concatenating block lists (no K/V recomputed); the children's KV is released.
        All of them must be settled."""
        merged = self.cache.merge(parent.seq, [c.seq for c in children])
        prefix = len(parent.token_ids)
        for child in children:
            parent.insert(child.token_ids[prefix:])  # the parent's context now matches `merged`
            self.release(child)
        self.cache.free(parent.seq)
        parent.seq = merged

    def release(self, thread: Thread) -> None:
        """Free the KV a finished thread kept (`keep_kv`)."""
        self.scheduler.release(thread)

    def resume(self, thread: Thread, extra_token_ids: list[int] = ()) -> None:
        """Continue a paused thread after prefilling `extra_token_ids` (e.g. a join's text)."""
        self.scheduler.resume(thread, list(extra_token_ids))

    def cancel(self, thread: Thread) -> None:
        """End the thread now and free its KV."""
        if thread.state is not ThreadState.FINISHED:
            self.scheduler.finish(thread, "cancelled")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        """One batched forward over the scheduled threads; an event per sampled token."""
        chunks, threads = self.scheduler.schedule()
        events = [StepEvent(t.thread_id, None, "", t.finish_reason) for t in self.scheduler.drain_failed()]
        self.last_step_tokens = 0
        self.last_step_threads = len(chunks)
        if not chunks:
            return events
        logits = self.runner.forward(chunks)
        ready = [i for i, c in enumerate(chunks) if c.seq.num_computed == len(c.seq)]
        if ready:
            sampling = [threads[i].sampling for i in ready]
            logits = logits[ready]
            if self.logits_processor is not None:
                logits = self.logits_processor([threads[i] for i in ready], logits)
            tokens = sample(logits, sampling, [threads[i].generator for i in ready])
            self.last_step_tokens = len(tokens)
            asking = [j for j, i in enumerate(ready) if threads[i].logprobs is not None]
            if asking:
                counts = [threads[ready[j]].sampling.logprobs for j in asking]
                found = token_logprobs(logits[asking], [tokens[j] for j in asking], counts)
                for j, entry in zip(asking, found, strict=True):
                    threads[ready[j]].logprobs.append(entry)
            events.extend(self._accept(threads[i], token) for i, token in zip(ready, tokens, strict=True))
        return events

    def generate(
        self, prompts: list[str] | list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None
    ) -> list[GenerationOutput]:
        """Run prompts to completion together; outputs in prompt order."""
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        threads = [self.add_thread(p, s) for p, s in zip(prompts, params, strict=True)]
        while any(t.state is not ThreadState.FINISHED for t in threads):
            self.step()
        return [self.output(t) for t in threads]

    def output(self, thread: Thread) -> GenerationOutput:
        return GenerationOutput(
            thread_id=thread.thread_id,
            prompt_token_ids=thread.token_ids[: thread.num_prompt_tokens],
            token_ids=list(thread.output_ids),
            text=thread.detokenizer.text if thread.detokenizer else "",
            finish_reason=thread.finish_reason or "",
            num_preemptions=thread.num_preemptions,
            logprobs=None if thread.logprobs is None else list(thread.logprobs),
        )

    # ---- internals -----------------------------------------------------------------

    def _new_thread(self, token_ids: list[int], sampling: SamplingParams) -> Thread:
        generator = torch.Generator(device=self.runner.device)  # sampling runs where the logits are
        generator.manual_seed(sampling.seed if sampling.seed is not None else self._seeds.getrandbits(63))
        thread = Thread(
            thread_id=self.scheduler.new_thread_id(),
            token_ids=token_ids,
            num_prompt_tokens=len(token_ids),
            sampling=sampling,
            generator=generator,
            detokenizer=IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None,
            logprobs=[] if sampling.logprobs is not None else None,
        )
        self.threads[thread.thread_id] = thread
        return thread

    def _accept(self, thread: Thread, token: int) -> StepEvent:
        """Record a sampled token, detokenize it, and end the thread if it should stop."""
        thread.token_ids.append(token)
        thread.output_ids.append(token)
        thread.num_generated += 1
        params = thread.sampling
        detok = thread.detokenizer
        text = detok.add([token]) if detok else ""
        reason = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif thread.num_generated >= params.max_new_tokens or len(thread.token_ids) >= self.max_context:
            reason = "length"
        if reason and detok:
            text += detok.flush()
        if params.stop and detok and (cut := _stop_cut(detok.text, text, params.stop)):
            detok.text, text = cut
            reason = "stop"
        if reason:
            self.scheduler.finish(thread, reason)
        return StepEvent(thread.thread_id, token, text, reason)


def _stop_cut(text: str, delta: str, stops: tuple[str, ...]) -> tuple[str, str] | None:
    """(text, delta) cut before the first stop string that the newest delta completed."""
    for stop in stops:
        at = text.find(stop, max(0, len(text) - len(delta) - len(stop) + 1))
        if at >= 0:
            kept = text[:at]
            return kept, delta[: max(0, len(delta) - (len(text) - at))]
    return None


def _generation_eos(path: Path) -> set[int]:
    file = path / "generation_config.json"
    if not file.exists():
        return set()
    eos = json.loads(file.read_text()).get("eos_token_id")
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
