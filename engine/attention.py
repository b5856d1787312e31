"""Attention over the paged KV cache, for a step that mixes decodes and prefill chunks.

New K/V are written to their slots first, then each query reads its sequence's context
by slot (a merged sequence's slots need not be contiguous, so reads go by slot, not
block). Decodes (one query each) run as one padded batch; each prefill chunk runs on its
own with a causal mask offset by the context already cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    row: int  # first of its queries among the step's T tokens
    num_queries: int
    context: torch.Tensor  # (L,) slots of the sequence up to its last query
    mask: torch.Tensor | None  # (1, 1, num_queries, L) bool; None when L == num_queries (plain causal)


@dataclass(slots=True)
class AttentionBatch:
    write_slots: torch.Tensor  # (T,) where each new token's K/V goes
    decode_rows: torch.Tensor | None  # (B,) rows of single-query sequences
    decode_context: torch.Tensor | None  # (B, Lmax) slots, padded
    decode_mask: torch.Tensor | None  # (B, 1, 1, Lmax) bool, False on padding
    prefills: list[PrefillChunk]


def build_batch(contexts: list[list[int]], num_queries: list[int], device: str) -> AttentionBatch:
    """Metadata for sequences whose last `num_queries[i]` of `contexts[i]` slots are new."""
    write_slots: list[int] = []
    decode_rows: list[int] = []
    decode_ctx: list[list[int]] = []
    prefills: list[PrefillChunk] = []
    row = 0
    for context, n in zip(contexts, num_queries, strict=True):
        write_slots.extend(context[len(context) - n :])
        if n == 1:
            decode_rows.append(row)
            decode_ctx.append(context)
        else:
            length = len(context)
            mask = None
            if length != n:
                q = torch.arange(length - n, length, device=device)[:, None]
                mask = (torch.arange(length, device=device)[None, :] <= q)[None, None]
            prefills.append(PrefillChunk(row, n, torch.tensor(context, device=device), mask))
        row += n
    batch = AttentionBatch(torch.tensor(write_slots, device=device), None, None, None, prefills)
    if decode_rows:
        lengths = torch.tensor([len(c) for c in decode_ctx], device=device)
        width = int(lengths.max())
        padded = torch.zeros(len(decode_ctx), width, dtype=torch.long, device=device)
        for i, context in enumerate(decode_ctx):
            padded[i, : len(context)] = torch.tensor(context, device=device)
        batch.decode_rows = torch.tensor(decode_rows, device=device)
        batch.decode_context = padded
        batch.decode_mask = (torch.arange(width, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    return batch


def paged_attention(
    q: torch.Tensor,  # (T, Hq, D)
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (num_slots, Hkv, D) of this layer
    v_cache: torch.Tensor,
    batch: AttentionBatch,
) -> torch.Tensor:
    k_cache.index_copy_(0, batch.write_slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, batch.write_slots, v.to(v_cache.dtype))
    out = torch.empty_like(q)
    if batch.decode_rows is not None:
        kc = k_cache[batch.decode_context].transpose(1, 2).to(q.dtype)  # (B, Hkv, Lmax, D)
        vc = v_cache[batch.decode_context].transpose(1, 2).to(q.dtype)
        qd = q[batch.decode_rows].unsqueeze(2)  # (B, Hq, 1, D)
        o = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=batch.decode_mask, enable_gqa=True)
        out[batch.decode_rows] = o.squeeze(2)
    for chunk in batch.prefills:
        kc = k_cache[chunk.context].transpose(0, 1).unsqueeze(0).to(q.dtype)  # (1, Hkv, L, D)
        vc = v_cache[chunk.context].transpose(0, 1).unsqueeze(0).to(q.dtype)
        rows = slice(chunk.row, chunk.row + chunk.num_queries)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # (1, Hq, n, D)
        o = F.scaled_dot_product_attention(
            qp, kc, vc, attn_mask=chunk.mask, is_causal=chunk.mask is None, enable_gqa=True
        )
        out[rows] = o[0].transpose(0, 1)
    return out
