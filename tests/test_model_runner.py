"""The engine's logits equal transformers' forward on the same checkpoint (fp32, CPU, 1e-4;
bf16 as close as transformers' own bf16)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cache_service import Sequence
from engine import decode_step
from engine.attention import build_batch
from engine.model import resolve_dtype
from engine.model_runner import Chunk, ModelRunner
from tests.checkpoints import VOCAB, load_reference

ATOL = 1e-4
MODEL_DIR = Path(__file__).resolve().parents[1] / "countdown" / "model"


def reference_logits(
    ref: torch.nn.Module, tokens: list[int], positions: list[int] | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(len(tokens), vocab) from transformers; `mask` is (L, L) bool, True = may attend."""
    kwargs = {}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor([positions])
    if mask is not None:
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        kwargs["attention_mask"] = additive[None, None]
    with torch.no_grad():
        return ref(torch.tensor([tokens]), **kwargs).logits[0]


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def merge_two_paths(runner: ModelRunner, prefix: int, paths: tuple[int, int], seed: int) -> Sequence:
    """A merged (Multiverse) sequence: `prefix` tokens, two paths forked from them (of
    `paths` tokens each, computed side by side), joined after the prefix."""
    parent = runner.cache.allocate(random_tokens(prefix, seed=seed))
    runner.forward([Chunk(parent, prefix)])
    forks = runner.cache.fork(parent, 2)
    for i, (path, n) in enumerate(zip(forks, paths, strict=True)):
        runner.cache.append(path, random_tokens(n, seed=seed + 1 + i))
    runner.forward([Chunk(p, n) for p, n in zip(forks, paths, strict=True)])
    merged = runner.cache.merge(parent, forks)
    for seq in (parent, *forks):
        runner.cache.free(seq)
    return merged


def multiverse_mask(prefix: int, paths: tuple[int, int], length: int) -> torch.Tensor:
    """(length, length) bool, True = may attend: causal, except that the two paths do not see
    each other; the prefix and what follows the paths see everything before them."""
    segment = [0] * prefix + [1] * paths[0] + [2] * paths[1] + [3] * (length - prefix - sum(paths))
    mask = torch.tril(torch.ones(length, length, dtype=torch.bool))
    for i in range(length):
        for j in range(i):
            if {segment[i], segment[j]} == {1, 2}:
                mask[i, j] = False
    return mask


@pytest.fixture(params=["fused", "gather", "flex"])
def runner(checkpoint: Path, request: pytest.FixtureRequest) -> Iterator[ModelRunner]:
    """Every decode path: the C++ step (CPU fp32), PyTorch gathering contexts, and FlexAttention
    reading the pool in place (the CUDA default; compiled to a C++ kernel here)."""
    fused = request.param == "fused"
    attention = "flex" if request.param == "flex" else "gather"
    # On the CPU each new shape compiles anew (engine.flex_decode); past dynamo's limit it would
    # quietly run uncompiled, which ignores the block mask: fail instead, so the kernel is tested.
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        runner = ModelRunner(
            checkpoint, kv_cache_bytes=4 * 2**20, block_size=8, fused_decode=fused, attention=attention
        )
        assert (runner.decode_step is not None) == fused  # the C++ step builds here (make test installs g++)
        yield runner


@pytest.fixture
def ref(checkpoint: Path) -> torch.nn.Module:
    return load_reference(checkpoint)


def test_prefill_and_32_decode_steps(runner: ModelRunner, ref: torch.nn.Module) -> None:
    tokens = random_tokens(21, seed=1)
    seq = runner.cache.allocate(tokens)
    got = runner.forward([Chunk(seq, len(seq))], all_logits=True)
    torch.testing.assert_close(got, reference_logits(ref, tokens), atol=ATOL, rtol=0)
    for step in range(32):
        token = int(got[-1].argmax())
        runner.cache.append(seq, [token])
        got = runner.forward([Chunk(seq, 1)])
        want = reference_logits(ref, seq.token_ids)[-1:]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"decode step {step}")
    runner.cache.check_integrity()


def test_chunked_prefill_mixed_with_decodes(runner: ModelRunner, ref: torch.nn.Module) -> None:
    long = runner.cache.allocate(random_tokens(30, seed=2))
    short = runner.cache.allocate(random_tokens(5, seed=3))
    runner.forward([Chunk(short, 5)])
    runner.cache.append(short, [7])
    # One step: a decode of `short` and the first 12 tokens of `long`; then the rest of `long`.
    got = runner.forward([Chunk(short, 1), Chunk(long, 12)])
    rest = runner.forward([Chunk(long, 18)], all_logits=True)
    torch.testing.assert_close(got[0], reference_logits(ref, short.token_ids)[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], reference_logits(ref, long.token_ids[:12])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(rest, reference_logits(ref, long.token_ids)[12:], atol=ATOL, rtol=0)


def test_forked_threads_match_their_full_text(runner: ModelRunner, ref: torch.nn.Module) -> None:
    parent = runner.cache.allocate(random_tokens(19, seed=4))  # 19: fork copies a partial block
    runner.forward([Chunk(parent, 19)])
    children = runner.cache.fork(parent, 3)
    for i, child in enumerate(children):
        runner.cache.append(child, random_tokens(6 + i, seed=10 + i))
    got = runner.forward([Chunk(c, len(c) - c.num_computed) for c in children], all_logits=True)
    row = 0
    for child in children:
        n = len(child) - 19
        want = reference_logits(ref, child.token_ids)[19:]
        torch.testing.assert_close(got[row : row + n], want, atol=ATOL, rtol=0)
        row += n
    runner.cache.check_integrity()


def test_merged_sequence_attends_as_multiverse_defines(runner: ModelRunner, ref: torch.nn.Module) -> None:
    """Paths run in parallel after a shared prefix; the conclusion sees all of them.

    Reference: transformers on the concatenated tokens with the merged positions and a
    mask where each path sees the prefix and itself, and the conclusion sees everything.
    """
    merged = merge_two_paths(runner, 13, (5, 8), seed=5)
    runner.cache.append(merged, random_tokens(6, seed=30))  # the conclusion
    got = runner.forward([Chunk(merged, 6)], all_logits=True)

    assert merged.positions[-6:] == list(range(21, 27))  # after the longest path (13 + 8)
    mask = multiverse_mask(13, (5, 8), len(merged))
    want = reference_logits(ref, merged.token_ids, merged.positions, mask)[-6:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    runner.cache.free(merged)
    runner.cache.check_integrity()
    assert runner.cache.stats().used_blocks == 0


@pytest.mark.parametrize("forks", [3, 7])  # 6 rows and 10: either side of the fused step's loops/GEMM line (8)
def test_decode_only_step_of_every_group_kind(runner: ModelRunner, ref: torch.nn.Module, forks: int) -> None:
    """Decode-only steps (the fused C++ step's case) mixing forked children that share a
    prefix (a cascade group, rows interleaved with others), sequences of different lengths
    (padded) and a merged sequence (positions that are not slot indices)."""
    merged = merge_two_paths(runner, 11, (4, 9), seed=70)
    others = [runner.cache.allocate(random_tokens(n, seed=80 + n)) for n in (3, 26, 35)]
    runner.forward([Chunk(s, len(s)) for s in others])
    children = runner.cache.fork(others[2], forks)
    runner.cache.free(others[2])
    for i, child in enumerate(children):
        runner.cache.append(child, random_tokens(1 + i, seed=90 + i))
    runner.forward([Chunk(c, len(c) - 35) for c in children])
    seqs = [children[0], merged, children[1], others[0], *children[2:], others[1]]
    for step in range(3):
        for i, seq in enumerate(seqs):
            runner.cache.append(seq, [5 + i + step])
        batch = build_batch(seqs, [1] * len(seqs), runner.cache.block_size, "cpu")
        assert [g.prefix is not None for g in batch.decodes] == [True, False]  # a cascade and a plain group
        assert batch.decodes[1].mask is not None  # padded
        got = runner.forward([Chunk(s, 1) for s in seqs])
        for logits, seq in zip(got, seqs, strict=True):
            mask = multiverse_mask(11, (4, 9), len(seq)) if seq is merged else None
            want = reference_logits(ref, seq.token_ids, seq.positions, mask)[-1]
            torch.testing.assert_close(logits, want, atol=ATOL, rtol=0, msg=f"step {step}")
    runner.cache.check_integrity()


def test_decodes_sharing_a_prefix_cascade_exactly(runner: ModelRunner, ref: torch.nn.Module) -> None:
    """Forked children decode as one cascade group (shared prefix read once), next to a
    thread with no shared prefix and a prefill chunk, all in one step."""
    parent = runner.cache.allocate(random_tokens(35, seed=40))
    loner = runner.cache.allocate(random_tokens(12, seed=41))
    runner.forward([Chunk(parent, 35), Chunk(loner, 12)])
    children = runner.cache.fork(parent, 4)
    for i, child in enumerate(children):
        runner.cache.append(child, random_tokens(3 + i, seed=50 + i))
    runner.forward([Chunk(c, len(c) - 35) for c in children])
    newcomer = runner.cache.allocate(random_tokens(9, seed=60))
    for i, seq in enumerate([*children, loner]):
        runner.cache.append(seq, [10 + i])
    steps = [Chunk(children[0], 1), Chunk(newcomer, 9), Chunk(loner, 1), *(Chunk(c, 1) for c in children[1:])]
    got = runner.forward(steps)
    for logits, chunk in zip(got, steps, strict=True):
        torch.testing.assert_close(logits, reference_logits(ref, chunk.seq.token_ids)[-1], atol=ATOL, rtol=0)


def bfloat16_logits(checkpoint: Path, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ours, transformers', exact), each (40, vocab) on the CPU: a prefill of 24 tokens then 16
    decode steps by a bf16 runner on `device`, transformers' bf16 model there over the same
    tokens, and the fp32 reference."""
    runner = ModelRunner(checkpoint, device, "bfloat16", kv_cache_bytes=4 * 2**20, block_size=8)
    assert runner.model.dtype == torch.bfloat16 and runner.cache.config.dtype == torch.bfloat16
    assert runner.decode_step is None  # the fused C++ step is fp32 only
    tokens = random_tokens(40, seed=11)
    seq = runner.cache.allocate(tokens[:24])
    got = [runner.forward([Chunk(seq, 24)], all_logits=True)]
    for token in tokens[24:]:
        runner.cache.append(seq, [token])
        got.append(runner.forward([Chunk(seq, 1)]))
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, attn_implementation="eager")
    with torch.no_grad():
        theirs_logits = theirs.to(device).eval()(torch.tensor([tokens], device=device)).logits[0].float()
    exact = reference_logits(load_reference(checkpoint), tokens)
    return torch.cat(got).cpu(), theirs_logits.cpu(), exact


def test_bfloat16_logits_are_as_close_to_fp32_as_transformers_in_bfloat16(checkpoint: Path) -> None:
    """Prefill then decode steps in bf16 (weights and KV): off from the fp32 reference by no
    more than transformers' own bf16 model is (x2, rounding orders differ)."""
    ours, theirs, exact = bfloat16_logits(checkpoint, "cpu")
    bound = (theirs - exact).abs().max().item()
    assert (ours - exact).abs().max().item() <= 2 * bound + 1e-3
    assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def test_the_serving_dtype_is_the_checkpoints_except_fp32_on_cuda() -> None:
    config = AutoConfig.from_pretrained(MODEL_DIR)  # the embedded model: saved in fp32
    assert resolve_dtype(None, config, "cpu") == torch.float32
    assert resolve_dtype(None, config, "cuda") == torch.bfloat16
    assert resolve_dtype("float16", config, "cuda:0") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", config, "cpu")


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_start() -> None:
    # torch waits on an existing lock for good; a replica killed mid-build left one (seen: every
    # later replica start hung in `ModelRunner.__init__`). A fresh process stands for the next start.
    assert decode_step.extension() is not None  # built (make test installs g++), so the next load only checks
    lock = decode_step.build_lock()
    lock.touch()
    old = time.time() - decode_step.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    try:
        start = [sys.executable, "-c", "from engine import decode_step; assert decode_step.extension()"]
        done = subprocess.run(start, capture_output=True, text=True, timeout=120, cwd=MODEL_DIR.parents[1])
    finally:
        lock.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "killed while it built" in done.stderr
