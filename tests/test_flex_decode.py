"""The paged decode's block mask (`engine.flex_decode`) lists exactly the pool tiles holding
each thread's context, marks a tile full only when all of it is that context, and its mask
admits exactly the context's slots. (Logits through the compiled kernel: test_model_runner.)"""

from __future__ import annotations

import pytest
import torch

from cache_service import CacheConfig, KVCache, Sequence
from engine.flex_decode import TILE, build_paged_decode

BS = 8


def computed(cache: KVCache, tokens: list[int], parent: Sequence | None = None) -> Sequence:
    """A sequence (or, with `parent`, `parent`'s tokens then `tokens`) with all K/V written."""
    seq = cache.allocate(tokens) if parent is None else parent
    if parent is not None:
        cache.append(seq, tokens)
    cache.mark_computed(seq, len(seq))
    return seq


def decoding_threads(cache: KVCache) -> list[Sequence]:
    """Threads of every layout, each with one new token to compute: forked children sharing a
    prefix (standard layout), one long enough to span several tiles, and a merged Multiverse
    sequence (its paths' slots scattered over their own blocks)."""
    root = computed(cache, list(range(3, 40)))
    children = [computed(cache, list(range(5, 6 + 4 * i)), child) for i, child in enumerate(cache.fork(root, 3))]
    long = computed(cache, [7] * (3 * TILE + 5))
    stem = computed(cache, list(range(9, 30)))
    paths = [computed(cache, [11] * (6 + 5 * i), path) for i, path in enumerate(cache.fork(stem, 2))]
    merged = cache.merge(stem, paths)
    assert not merged.standard_layout
    seqs = [*children, long, merged]
    for seq in seqs:
        cache.append(seq, [1])  # this step's token: its slot allocated, K/V about to be written
    return seqs


@pytest.mark.parametrize("num_blocks", [200, 203])  # a pool of whole tiles, and one ending mid-tile
def test_block_mask_covers_each_threads_context_exactly(num_blocks: int) -> None:
    cache = KVCache(CacheConfig(1, 1, 4, num_blocks=num_blocks, block_size=BS))
    seqs = decoding_threads(cache)
    num_slots = cache.config.num_slots
    paged = build_paged_decode(list(enumerate(seqs)), BS, num_slots, "cpu")
    mask = paged.block_mask
    kv_idx = torch.arange(num_slots)
    for b, seq in enumerate(seqs):
        context = torch.zeros(num_slots, dtype=torch.bool)
        context[seq.slots] = True  # every token up to and including the new one
        admitted = mask.mask_mod(torch.tensor(b), torch.tensor(0), torch.tensor(0), kv_idx)
        assert torch.equal(admitted, context), f"thread {b}"
        tiles = context.nonzero().squeeze(1).div(TILE, rounding_mode="floor").unique().tolist()
        partial = mask.kv_indices[b, 0, 0, : mask.kv_num_blocks[b, 0, 0]].tolist()
        full = mask.full_kv_indices[b, 0, 0, : mask.full_kv_num_blocks[b, 0, 0]].tolist()
        assert sorted(partial + full) == tiles, f"thread {b}"
        for tile in full:
            assert context[tile * TILE : (tile + 1) * TILE].all()
    assert mask.full_kv_num_blocks[3, 0, 0] >= 2  # the long thread's middle tiles skip the mask
    assert paged.rows == slice(0, len(seqs))


def test_rows_out_of_order_are_indexed() -> None:
    cache = KVCache(CacheConfig(1, 1, 4, num_blocks=200, block_size=BS))
    seqs = decoding_threads(cache)[:2]
    paged = build_paged_decode([(4, seqs[0]), (1, seqs[1])], BS, cache.config.num_slots, "cpu")
    assert paged.rows.tolist() == [4, 1]


def test_block_sizes_that_do_not_divide_a_tile_are_refused() -> None:
    with pytest.raises(ValueError, match="block size"):
        build_paged_decode([], 24, 1024, "cpu")
