"""Decode attention straight from the paged pool with PyTorch's FlexAttention (the CUDA path).

The gather path (`engine.attention`) copies every decoding thread's context out of the
pool in every layer; at 16 threads x 8k tokens of an 8B model that is ~16 GiB moved per
step. Here the pool itself is the key/value tensor and a block mask says which of it each
thread reads, so a thread's K/V is read once, in place, by a fused kernel
(`torch.compile` lowers FlexAttention to FlashDecoding on CUDA and to a C++ kernel on the CPU):

- q: (B, Hq, 1, D), one row per decoding thread; K/V: (1, Hkv, num_slots, D), the pool as
  it lies (broadcast over B, no copy);
- the block mask lists, per thread, the 128-slot tiles of the pool holding its context;
- inside a tile, `member` (B, tiles x 128 / block_size) holds one bit per slot of each
  cache block: set where that slot is in the thread's context. Any layout works (a merged
  Multiverse sequence's slots are scattered); tiles whose bits are all set are "full" and
  skip the mask.

Shared prefixes are read once per thread (the gather path's cascade reads them once per
group); on a GPU the repeats of a hot prefix mostly come from L2. Prefill chunks keep the
gather path: their context is read once for all of the chunk's queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from cache_service import Sequence

TILE = 128  # slots per block-mask tile: FlexAttention's default block, which its kernels are tuned for


@dataclass(slots=True)
class PagedDecode:
    rows: torch.Tensor | slice  # (B,) rows of the decoding threads among the step's T tokens
    size: int  # B
    block_mask: BlockMask


@cache
def compiled_flex_attention(device_type: str) -> Callable[..., torch.Tensor]:
    """FlexAttention compiled once per process and device type (uncompiled, it materializes
    every score). On CUDA shapes are marked dynamic after the first recompile (B changes every
    step). On the CPU shapes stay static: torch 2.13's C++ template does not build with dynamic
    ones ("cur_qSplitSize1 was not declared"); the CPU runs this path only when asked to."""
    return torch.compile(flex_attention, fullgraph=True, dynamic=False if device_type == "cpu" else None)


def build_paged_decode(
    decodes: list[tuple[int, Sequence]], block_size: int, num_slots: int, device: str
) -> PagedDecode:
    """The block mask for threads that each compute one token (row, sequence), their K/V
    for all tokens up to `num_computed + 1` already written to the pool."""
    if not 0 < block_size <= 62 or TILE % block_size:
        raise ValueError(f"paged decode needs a block size dividing {TILE} and at most 62, not {block_size}")
    per_tile = TILE // block_size
    tiles = -(-num_slots // TILE)
    all_set = (1 << block_size) - 1
    rows, cols, bits = [], [], []  # one entry per (thread, cache block) it reads
    for b, (_, seq) in enumerate(decodes):
        end = seq.num_computed + 1
        if seq.standard_layout:  # token i at slot-in-block i: full blocks, then a partial one
            held = seq.blocks[: -(-end // block_size)]
            part = end % block_size
            cols.extend(held)
            bits.extend([all_set] * (len(held) - 1) + [(1 << part) - 1 if part else all_set])
        else:
            by_block: dict[int, int] = {}
            for slot in seq.slots[:end]:
                by_block[slot // block_size] = by_block.get(slot // block_size, 0) | 1 << (slot % block_size)
            cols.extend(by_block)
            bits.extend(by_block.values())
        rows.extend([b] * (len(cols) - len(rows)))
    size = len(decodes)
    member = torch.zeros(size, tiles * per_tile, dtype=torch.int64, device=device)  # (B, cache blocks, padded)
    index = torch.tensor([rows, cols], device=device)
    member.index_put_((index[0], index[1]), torch.tensor(bits, device=device))
    by_tile = member.view(size, tiles, per_tile)
    full = (by_tile == all_set).all(-1)  # (B, tiles): every slot is the thread's
    partial = (by_tile != 0).any(-1) & ~full

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (member[b, kv_idx // block_size] >> (kv_idx % block_size)) & 1 == 1

    def listed(used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 1) counts and (B, 1, 1, tiles) indices of the used tiles, used ones first."""
        order = torch.argsort(used.to(torch.int8), dim=-1, descending=True, stable=True)
        return used.sum(-1, dtype=torch.int32)[:, None, None], order.to(torch.int32)[:, None, None, :]

    kv_num, kv_index = listed(partial)
    full_num, full_index = listed(full)
    block_mask = BlockMask.from_kv_blocks(
        kv_num,
        kv_index,
        full_num,
        full_index,
        BLOCK_SIZE=(TILE, TILE),
        mask_mod=mask_mod,
        seq_lengths=(1, num_slots),
    )
    first = decodes[0][0]
    in_order = all(row == first + i for i, (row, _) in enumerate(decodes))
    return PagedDecode(
        rows=slice(first, first + size) if in_order else torch.tensor([row for row, _ in decodes], device=device),
        size=size,
        block_mask=block_mask,
    )


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, paged: PagedDecode) -> torch.Tensor:
    """(B, Hq, D) outputs for q: (B, Hq, D); k_cache, v_cache: (num_slots, Hkv, D) of this layer."""
    k = k_cache.transpose(0, 1).unsqueeze(0)  # (1, Hkv, num_slots, D): a view of the pool
    v = v_cache.transpose(0, 1).unsqueeze(0)
    out = compiled_flex_attention(q.device.type)(
        q.unsqueeze(2), k, v, block_mask=paged.block_mask, enable_gqa=q.shape[1] != k.shape[1]
    )  # (B, Hq, 1, D)
    return out.squeeze(2)
