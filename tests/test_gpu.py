"""On a CUDA device (skipped without one; `make gpu-check` runs them): logits against
transformers in bf16, a fork and a Multiverse merge, sampling at temperature > 0, and
loading without a second copy of the weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from engine.engine import Engine
from engine.model import CausalLM
from engine.model_runner import Chunk, ModelRunner
from engine.sampling import SamplingParams
from tests.checkpoints import load_reference
from tests.test_model_runner import (
    bfloat16_logits,
    merge_two_paths,
    multiverse_mask,
    random_tokens,
    reference_logits,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
MiB = 2**20


def test_bf16_logits_on_cuda_are_as_close_as_transformers_bf16(checkpoint: Path) -> None:
    ours, theirs, exact = bfloat16_logits(checkpoint, "cuda")
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3


def test_fork_and_multiverse_merge_on_cuda_attend_as_on_the_cpu(checkpoint: Path) -> None:
    runner = ModelRunner(checkpoint, "cuda", "float32", kv_cache_bytes=4 * MiB, block_size=8)
    merged = merge_two_paths(runner, 13, (5, 8), seed=5)
    runner.cache.append(merged, random_tokens(6, seed=30))
    got = runner.forward([Chunk(merged, 6)], all_logits=True).cpu()
    mask = multiverse_mask(13, (5, 8), len(merged))
    want = reference_logits(load_reference(checkpoint), merged.token_ids, merged.positions, mask)[-6:]
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    runner.cache.free(merged)
    runner.cache.check_integrity()


def test_sampling_on_cuda_is_reproducible_per_seed(checkpoint: Path) -> None:
    params = [SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=i) for i in range(4)]
    prompts = [random_tokens(6 + i, seed=i) for i in range(4)]
    first = Engine(checkpoint, "cuda", kv_cache_bytes=4 * MiB).generate(prompts, params)
    again = Engine(checkpoint, "cuda", kv_cache_bytes=4 * MiB).generate(prompts, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) > 1


def test_loading_holds_no_second_copy_of_the_weights() -> None:
    """A ~400 MB (fp32) checkpoint loaded in bf16: the peak is the bf16 model plus little."""
    from bench.engine import make_checkpoint

    folder = make_checkpoint("large-100M", Path(tempfile.mkdtemp(prefix="braid-gpu-")))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = CausalLM.from_pretrained(folder, "bfloat16", "cuda")
    weights = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    assert model.dtype == torch.bfloat16
    assert peak <= 1.25 * weights, (peak, weights)
