"""Attention over the paged KV cache, for a step that mixes decodes and prefill chunks.

New K/V are written to their slots first, then each query reads its sequence's context
by slot (a merged sequence's slots need not be contiguous, so reads go by slot, not
block). Each prefill chunk runs on its own with a causal mask offset by the context
already cached. Decodes (one query each) run in groups:

- threads that share leading full blocks (forked children, prompts with a common
  prefix) form a cascade group: the shared prefix's K/V is read once and attended by all
  of the group's queries in one call, each thread's own suffix in a second, batched
  call, and the two are combined by their log-sum-exps (exact, not an approximation);
- the rest run as one padded batch.

With `paged` (the CUDA default, `engine.flex_decode`), decodes instead read the pool in
place through FlexAttention's block mask, and only prefill chunks gather.

Grouped-query attention without copying K/V: the g = Hq / Hkv query heads that share a
KV head are laid out as g "query positions" of that head, q: (B, Hkv, g, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cache_service import Sequence
from engine.flex_decode import PagedDecode, build_paged_decode, paged_decode


@dataclass(slots=True)
class PrefillChunk:
    row: int  # first of its queries among the step's T tokens
    num_queries: int
    context: torch.Tensor | slice  # (L,) slots of the sequence up to its last query
    mask: torch.Tensor | None  # (1, 1, num_queries, L) bool; None when L == num_queries (plain causal)


@dataclass(slots=True)
class DecodeGroup:
    rows: torch.Tensor | slice  # (B,) rows of its single-query sequences among the T tokens
    size: int  # B
    prefix: torch.Tensor | slice | None  # (P,) slots all B sequences share (cascade), or None
    context: torch.Tensor | slice  # (B * Lmax,) each sequence's slots after the prefix, padded to Lmax
    max_len: int
    mask: torch.Tensor | None  # (B, 1, 1, Lmax) additive, -inf on padding; None when no padding


@dataclass(slots=True)
class AttentionBatch:
    write_slots: torch.Tensor  # (T,) where each new token's K/V goes
    decodes: list[DecodeGroup]
    prefills: list[PrefillChunk]
    paged: PagedDecode | None  # all decodes, read in place (then `decodes` is empty)


def build_batch(
    seqs: list[Sequence], num_queries: list[int], block_size: int, device: str, paged_slots: int | None = None
) -> AttentionBatch:
    """Metadata for a step computing the last `num_queries[i]` tokens of each `seqs[i]`
    (their slots already allocated, up to `num_computed + num_queries`). With `paged_slots`
    (the pool's size) decodes read the pool through FlexAttention."""
    write_slots: list[int] = []
    decode_rows: list[tuple[int, Sequence]] = []
    prefills: list[PrefillChunk] = []
    row = 0
    for seq, n in zip(seqs, num_queries, strict=True):
        end = seq.num_computed + n
        write_slots.extend(seq.slots[seq.num_computed : end])
        if n == 1:
            decode_rows.append((row, seq))
        else:
            mask = None
            if end != n:
                q = torch.arange(end - n, end, device=device)[:, None]
                mask = (torch.arange(end, device=device)[None, :] <= q)[None, None]
            prefills.append(PrefillChunk(row, n, slot_index(seq, 0, end, block_size, device), mask))
        row += n
    write = torch.tensor(write_slots, device=device)
    if paged_slots is not None:
        paged = build_paged_decode(decode_rows, block_size, paged_slots, device) if decode_rows else None
        return AttentionBatch(write, [], prefills, paged)
    groups = share_groups(decode_rows, block_size)
    decodes = [_decode_group(rows, prefix, block_size, device) for rows, prefix in groups]
    return AttentionBatch(write, decodes, prefills, None)


def share_groups(decodes: list[tuple[int, Sequence]], block_size: int) -> list[tuple[list[tuple[int, Sequence]], int]]:
    """Split decodes into (members, shared prefix length in tokens); 0 means no cascade.

    Members of a group hold the same first `prefix // block_size` blocks, all full and
    before their newest token. Only standard-layout sequences qualify (their block list
    says exactly which slots hold which tokens).
    """
    by_first: dict[int, list[tuple[int, Sequence]]] = {}
    plain: list[tuple[int, Sequence]] = []
    for row, seq in decodes:
        if seq.standard_layout and len(seq) > block_size:
            by_first.setdefault(seq.blocks[0], []).append((row, seq))
        else:
            plain.append((row, seq))
    groups = []
    for members in by_first.values():
        if len(members) == 1:
            plain.extend(members)
            continue
        lead = members[0][1].blocks
        shared = min((len(s) - 1) // block_size for _, s in members)
        for _, seq in members[1:]:
            shared = next((i for i in range(shared) if seq.blocks[i] != lead[i]), shared)
        groups.append((members, shared * block_size))
    if plain:
        groups.append((sorted(plain, key=lambda m: m[0]), 0))
    return groups


def slot_index(seq: Sequence, start: int, end: int, block_size: int, device: str) -> torch.Tensor | slice:
    """The pool slots of tokens start..end of `seq`: a slice when they are consecutive (a
    view, no gather: the usual case, blocks being handed out in order), else an index."""
    if seq.standard_layout:
        first, last = start // block_size, (end - 1) // block_size
        b0 = seq.blocks[first]
        if all(seq.blocks[i] == b0 + i - first for i in range(first + 1, last + 1)):
            return slice(seq.slots[start], seq.slots[start] + end - start)
    return torch.tensor(seq.slots[start:end], device=device)


def gather(cache: torch.Tensor, index: torch.Tensor | slice) -> torch.Tensor:
    return cache[index] if isinstance(index, slice) else cache.index_select(0, index)


def _decode_group(members: list[tuple[int, Sequence]], prefix: int, block_size: int, device: str) -> DecodeGroup:
    rows = [row for row, _ in members]
    if len(members) == 1:  # one sequence: no padding, and often a plain slice of the pool
        seq = members[0][1]
        end = seq.num_computed + 1
        context = slot_index(seq, prefix, end, block_size, device)
        return DecodeGroup(slice(rows[0], rows[0] + 1), 1, None, context, end - prefix, None)
    contexts = [seq.slots[prefix : seq.num_computed + 1] for _, seq in members]
    lengths = [len(c) for c in contexts]
    width = max(lengths)
    padded = [slot for c in contexts for slot in (c + [0] * (width - len(c)))]  # pad slot 0, masked out
    mask = None
    if min(lengths) != width:
        lens = torch.tensor(lengths, device=device)
        valid = torch.arange(width, device=device)[None, :] < lens[:, None]
        mask = torch.zeros(valid.shape, device=device).masked_fill(~valid, float("-inf"))[:, None, None, :]
    first = members[0][1]
    in_order = rows == list(range(rows[0], rows[0] + len(rows)))
    return DecodeGroup(
        rows=slice(rows[0], rows[0] + len(rows)) if in_order else torch.tensor(rows, device=device),
        size=len(rows),
        prefix=slot_index(first, 0, prefix, block_size, device) if prefix else None,
        context=torch.tensor(padded, device=device),
        max_len=width,
        mask=mask,
    )


def paged_attention(
    q: torch.Tensor,  # (T, Hq, D)
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    k_cache: torch.Tensor,  # (num_slots, Hkv, D) of this layer
    v_cache: torch.Tensor,
    batch: AttentionBatch,
) -> torch.Tensor:
    """(T, Hq, D) attention output of every new token."""
    k_cache.index_copy_(0, batch.write_slots, k)
    v_cache.index_copy_(0, batch.write_slots, v)
    t, hq, d = q.shape
    hkv = k.shape[1]
    if len(batch.decodes) == 1 and not batch.prefills and batch.decodes[0].size == t:
        return _decode(q, k_cache, v_cache, batch.decodes[0]).reshape(t, hq, d)  # the common all-decode step
    if batch.paged is not None and not batch.prefills:
        return paged_decode(q, k_cache, v_cache, batch.paged)
    out = torch.empty_like(q)
    if batch.paged is not None:
        out[batch.paged.rows] = paged_decode(q[batch.paged.rows], k_cache, v_cache, batch.paged)
    for group in batch.decodes:
        out[group.rows] = _decode(q[group.rows], k_cache, v_cache, group).reshape(-1, hq, d)
    for chunk in batch.prefills:
        kc = gather(k_cache, chunk.context).transpose(0, 1).unsqueeze(0)  # (1, Hkv, L, D)
        vc = gather(v_cache, chunk.context).transpose(0, 1).unsqueeze(0)
        rows = slice(chunk.row, chunk.row + chunk.num_queries)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # (1, Hq, n, D)
        o = F.scaled_dot_product_attention(
            qp, kc, vc, attn_mask=chunk.mask, is_causal=chunk.mask is None, enable_gqa=hq != hkv
        )
        out[rows] = o[0].transpose(0, 1)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
    """(B, Hkv, g, D) outputs for q: (B, Hq, D), one query per sequence."""
    b, hq, d = group.size, q.shape[1], q.shape[2]
    hkv = k_cache.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    kc = gather(k_cache, group.context).view(b, group.max_len, hkv, d).transpose(1, 2)  # (B, Hkv, L, D)
    vc = gather(v_cache, group.context).view(b, group.max_len, hkv, d).transpose(1, 2)
    if group.prefix is None:
        return F.scaled_dot_product_attention(qg, kc, vc, attn_mask=group.mask)
    out_s, lse_s = attention_lse(qg, kc, vc, group.mask)  # own suffixes: (B, Hkv, g, D), (B, Hkv, g)
    # All B * g queries of a KV head attend the shared prefix together: (1, Hkv, B * g, D).
    kp = gather(k_cache, group.prefix).transpose(0, 1).unsqueeze(0)  # (1, Hkv, P, D)
    vp = gather(v_cache, group.prefix).transpose(0, 1).unsqueeze(0)
    qp = qg.transpose(0, 1).reshape(1, hkv, -1, d)
    out_p, lse_p = attention_lse(qp, kp, vp, None)
    out_p = out_p.view(hkv, b, -1, d).transpose(0, 1)  # (B, Hkv, g, D)
    lse_p = lse_p.view(hkv, b, -1).transpose(0, 1)  # (B, Hkv, g)
    # Each part's weight is its share of the total softmax mass: softmax over the two LSEs.
    weights = torch.softmax(torch.stack((lse_p, lse_s)), dim=0).unsqueeze(-1)  # (2, B, Hkv, g, 1)
    return torch.addcmul(out_s * weights[1], out_p, weights[0]).to(q.dtype)


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (B, H, Lq, D) and its log-sum-exp (B, H, Lq), no causal mask."""
    if q.device.type == "cpu" and q.dtype == torch.float32:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)[:2]
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    lse = scores.logsumexp(-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype), v), lse
