"""The engine end to end: greedy equals transformers, sampling is reproducible per thread,
threads do not disturb each other, the pool can run short, threads pause/resume/cancel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.engine import Engine
from engine.sampling import SamplingParams
from tests.checkpoints import load_reference, make_text_checkpoint
from tests.test_model_runner import random_tokens

MiB = 2**20


def hf_greedy(ref: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt) :].tolist()


def engine_with_blocks(checkpoint: Path, num_blocks: int) -> Engine:
    """An engine whose pool holds exactly `num_blocks` blocks of 8 slots."""
    bytes_per_block = Engine(checkpoint, kv_cache_bytes=MiB, block_size=8).cache.config.bytes_per_block
    return Engine(checkpoint, kv_cache_bytes=num_blocks * bytes_per_block, block_size=8)


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_checkpoint(tmp_path_factory.mktemp("text"))


def test_greedy_equals_transformers_generate(checkpoint: Path) -> None:
    engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
    prompts = [random_tokens(n, seed=n) for n in (3, 9, 17, 30)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=40))
    ref = load_reference(checkpoint)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == hf_greedy(ref, prompt, 40)
    engine.cache.check_integrity()
    assert engine.cache.stats().used_blocks == 0


def test_logprobs_are_the_models_and_inserted_tokens_have_none(checkpoint: Path) -> None:
    engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
    prompt = random_tokens(7, seed=3)
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=5, logprobs=3)
    out = engine.generate([prompt], params)[0]
    ref = load_reference(checkpoint)
    with torch.no_grad():  # the reference's distribution at each sampled token (untempered)
        logits = ref(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)  # (12, vocab)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 12
    for row, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert entry.logprob == pytest.approx(expected[row, token].item(), abs=1e-4)
        top_ids = [token_id for token_id, _ in entry.top]
        assert top_ids == expected[row].topk(3).indices.tolist()
    assert Engine(checkpoint, kv_cache_bytes=4 * MiB).generate([prompt], SamplingParams(8))[0].logprobs is None

    thread = engine.add_thread(prompt, SamplingParams(max_new_tokens=6, logprobs=0))
    while thread.num_generated < 2:
        engine.step()
    engine.pause(thread)
    engine.resume(thread, [5, 6, 7])  # a join's text: not sampled, so no logprob
    while engine.has_work():
        engine.step()
    entries = engine.output(thread).logprobs
    assert [entry.logprob is None for entry in entries] == [False] * 2 + [True] * 3 + [False] * 4
    assert all(entry.top == () for entry in entries)


def test_a_thread_ends_where_the_models_context_does(checkpoint: Path) -> None:
    engine = Engine(checkpoint, kv_cache_bytes=8 * MiB, block_size=8)
    assert engine.max_context == 1024  # the tiny checkpoints' max_position_embeddings
    out = engine.generate([random_tokens(1000, seed=1)], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (24, "length")
    with pytest.raises(ValueError, match="the model's context is 1024"):
        engine.add_thread(random_tokens(1024, seed=2))


def sampled(seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=seed)


def test_same_seed_same_output_and_batch_does_not_matter(checkpoint: Path) -> None:
    prompts = [random_tokens(5 + i, seed=100 + i) for i in range(16)]
    params = [sampled(seed=i) for i in range(16)]
    alone = []
    for prompt, p in zip(prompts, params, strict=True):
        engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
        alone.append(engine.generate([prompt], p)[0].token_ids)
    batched = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8).generate(prompts, params)
    assert [o.token_ids for o in batched] == alone
    assert len({tuple(t) for t in alone}) > 1  # sampling really samples


def test_threads_sharing_a_prefix_use_the_prefix_index(checkpoint: Path) -> None:
    engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
    prefix = random_tokens(40, seed=7)
    first = engine.generate([prefix + [5]], SamplingParams(max_new_tokens=4))[0]
    rest = engine.generate([prefix + [6 + i] for i in range(8)], SamplingParams(max_new_tokens=4))
    assert engine.cache.stats().prefix_hit_tokens == 8 * 40  # each reused all 5 full blocks
    ref = load_reference(checkpoint)
    assert first.token_ids == hf_greedy(ref, prefix + [5], 4)
    assert rest[3].token_ids == hf_greedy(ref, prefix + [9], 4)


def test_more_threads_than_blocks_all_complete_correctly(checkpoint: Path) -> None:
    prompts = [random_tokens(12, seed=200 + i) for i in range(16)]
    params = SamplingParams(max_new_tokens=30)
    roomy = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8).generate(prompts, params)
    # 24 blocks of 8 slots: 16 threads need 16 x 6 at the end.
    small = engine_with_blocks(checkpoint, 24)
    tight = small.generate(prompts, params)
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert sum(o.num_preemptions for o in tight) > 0
    small.cache.check_integrity()
    assert small.cache.stats().used_blocks == 0


def test_a_thread_admitted_this_step_is_never_the_victim_of_a_less_urgent_one(checkpoint: Path) -> None:
    # A resumed thread needs 3 more blocks (a join's text); an urgent new thread is admitted
    # first in the same step and leaves one free. The resumed one must preempt itself, not the
    # thread just admitted (its chunk already in the step: computing it would find no KV).
    engine = engine_with_blocks(checkpoint, 5)
    resumed = engine.add_thread(random_tokens(6, seed=1), SamplingParams(max_new_tokens=6))
    engine.step()
    engine.pause(resumed)
    engine.resume(resumed, random_tokens(24, seed=2))
    urgent_prompt = random_tokens(24, seed=3)
    urgent = engine.add_thread(urgent_prompt, SamplingParams(max_new_tokens=4))
    urgent.deadline = 0.0  # earliest deadline: the most urgent thread of the step
    while engine.has_work():
        engine.step()
    assert urgent.num_preemptions == 0 and resumed.num_preemptions == 1
    assert urgent.output_ids == hf_greedy(load_reference(checkpoint), urgent_prompt, 4)
    assert resumed.finish_reason == "length"
    engine.cache.check_integrity()
    assert engine.cache.stats().used_blocks == 0


def test_prompt_larger_than_the_pool_fails_cleanly(checkpoint: Path) -> None:
    engine = engine_with_blocks(checkpoint, 4)
    big = engine.add_thread(random_tokens(40, seed=1), SamplingParams(max_new_tokens=4))
    small = engine.add_thread(random_tokens(4, seed=2), SamplingParams(max_new_tokens=4))
    events = []
    for _ in range(20):
        events += engine.step()
    assert big.finish_reason == "out_of_blocks" and small.finish_reason == "length"
    assert any(e.thread_id == big.thread_id and e.finish_reason == "out_of_blocks" for e in events)


def test_long_prompt_is_prefilled_in_chunks(checkpoint: Path) -> None:
    prompt = random_tokens(50, seed=3)
    engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8, max_num_batched_tokens=16)
    out = engine.generate([prompt, random_tokens(6, seed=4)], SamplingParams(max_new_tokens=8))
    assert out[0].token_ids == hf_greedy(load_reference(checkpoint), prompt, 8)


def test_pause_resume_with_inserted_tokens_and_cancel(checkpoint: Path) -> None:
    engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
    prompt = random_tokens(10, seed=5)
    paused = engine.add_thread(prompt, SamplingParams(max_new_tokens=12))
    other = engine.add_thread(random_tokens(7, seed=6), SamplingParams(max_new_tokens=50))
    for _ in range(4):
        engine.step()
    engine.pause(paused)
    held = list(paused.seq.blocks)
    for _ in range(5):
        assert all(e.thread_id != paused.thread_id for e in engine.step())
    assert paused.seq.blocks == held  # KV kept while paused
    engine.resume(paused, [11, 12, 13])
    while paused.finish_reason is None:
        engine.step()
    # Same as transformers continuing greedily from the whole context.
    context = prompt + paused.output_ids[:4] + [11, 12, 13]
    assert paused.output_ids[7:] == hf_greedy(load_reference(checkpoint), context, 8)
    engine.cancel(other)
    assert other.finish_reason == "cancelled" and other.seq is None
    engine.cache.check_integrity()
    assert engine.cache.stats().used_blocks == 0 and not engine.has_work()


def test_forked_children_continue_the_parents_context(checkpoint: Path) -> None:
    engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
    prompt = random_tokens(13, seed=11)
    parent = engine.add_thread(prompt, SamplingParams(max_new_tokens=50))
    for _ in range(4):
        engine.step()
    children = engine.fork(parent, [[20 + i] * (i + 1) for i in range(3)], SamplingParams(max_new_tokens=10))
    assert parent.state.value == "paused"
    while any(c.finish_reason is None for c in children):
        engine.step()
    ref = load_reference(checkpoint)
    for child in children:
        context = child.token_ids[: child.num_prompt_tokens]
        assert context[: len(parent.token_ids)] == parent.token_ids and child.output_ids == hf_greedy(ref, context, 10)
    assert engine.cache.stats().prefix_hit_tokens == 0  # shared by fork, not by the index
    engine.cancel(parent)
    engine.cache.check_integrity()
    assert engine.cache.stats().used_blocks == 0


def test_stop_conditions(checkpoint: Path) -> None:
    engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
    prompt = random_tokens(8, seed=9)
    free_run = engine.generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    stop_at = free_run.token_ids[5]
    stopped = engine.generate([prompt], SamplingParams(max_new_tokens=20, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run.token_ids[: free_run.token_ids.index(stop_at) + 1]
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 20


def test_text_prompts_stop_strings_and_incremental_text(text_checkpoint: Path) -> None:
    engine = Engine(text_checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
    full = engine.generate(["héllo wörld ✓ "], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    assert full.text == engine.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[10:12]
    cut = engine.generate(["héllo wörld ✓ "], SamplingParams(max_new_tokens=30, stop=(stop,), ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]


def test_incremental_detokenizer_never_splits_a_character(text_checkpoint: Path) -> None:
    from engine.detokenizer import IncrementalDetokenizer
    from tests.checkpoints import byte_tokenizer

    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("naïve café ✓ 日本").ids
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([t]) for t in ids]
    assert "".join(deltas) == "naïve café ✓ 日本" == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_bad_input_is_refused(checkpoint: Path) -> None:
    engine = Engine(checkpoint, kv_cache_bytes=4 * MiB, block_size=8)
    with pytest.raises(ValueError, match="empty"):
        engine.add_thread([])
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_thread([10_000])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_thread("text")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
