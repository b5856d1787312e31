"""Turns one scheduled step (sequences and how many of their tokens to compute) into tensors,
runs the model over the paged cache and returns logits. No scheduling decisions here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cache_service import CacheConfig, KVCache, Sequence
from engine import decode_step
from engine.attention import build_batch
from engine.model import CausalLM

ATTENTION = ("flex", "gather")


@dataclass(slots=True, frozen=True)
class Chunk:
    """Compute K/V for `num_tokens` tokens of `seq`, starting at `seq.num_computed`."""

    seq: Sequence
    num_tokens: int


class ModelRunner:
    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        kv_cache_bytes: int = 512 * 2**20,
        block_size: int = 16,
        fused_decode: bool = True,
        attention: str | None = None,
    ) -> None:
        """`attention`: how decodes read the pool: "flex" (in place, `engine.flex_decode`) or
        "gather" (`engine.attention`); None: flex on CUDA, gather elsewhere. On the CPU in fp32
        the fused C++ step (`fused_decode`) runs decode-only steps either way."""
        if attention not in (None, *ATTENTION):
            raise ValueError(f"unknown attention {attention!r}; known: {', '.join(ATTENTION)}")
        self.device = device
        self.model = CausalLM.from_pretrained(model_path, dtype=dtype, device=device)
        dtype = self.model.dtype  # resolved: None is the checkpoint's (see `engine.model.resolve_dtype`)
        self.decode_step = decode_step.build(self.model) if fused_decode else None  # CPU fp32 only
        args = self.model.args
        probe = CacheConfig(args.num_layers, args.num_kv_heads, args.head_dim, 1, block_size, dtype, device)
        num_blocks = kv_cache_bytes // probe.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} is less than one block ({probe.bytes_per_block} bytes)")
        self.cache = KVCache(
            CacheConfig(args.num_layers, args.num_kv_heads, args.head_dim, num_blocks, block_size, dtype, device)
        )
        self.attention = attention or ("flex" if str(device).startswith("cuda") else "gather")
        self.paged_slots = self.cache.config.num_slots if self.attention == "flex" else None
        shape = (args.num_layers, -1, args.num_kv_heads, args.head_dim)
        # (layers, num_slots, Hkv, D) views of the pool: attention reads and writes by slot.
        self.kv = (self.cache.pool.k.view(shape), self.cache.pool.v.view(shape))

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], all_logits: bool = False) -> torch.Tensor:
        """Logits (len(chunks), vocab) at each chunk's last token, or (T, vocab) for every token.

        Marks the computed tokens in the cache, which may index newly full blocks.
        """
        ids: list[int] = []
        positions: list[int] = []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            end = start + chunk.num_tokens
            if not 0 < chunk.num_tokens <= len(seq) - start:
                raise ValueError(f"chunk of {chunk.num_tokens} tokens but sequence {seq.seq_id} has {len(seq) - start}")
            ids.extend(seq.token_ids[start:end])
            positions.extend(seq.positions[start:end])
        seqs = [c.seq for c in chunks]
        if self.decode_step is not None and len(ids) == len(chunks):  # decode-only: the C++ step
            write_slots = [seq.slots[seq.num_computed] for seq in seqs]
            groups = decode_step.decode_groups(seqs, self.cache.block_size)
            logits = self.decode_step.forward(ids, positions, write_slots, groups, *self.kv)
        else:
            logits = self._forward(ids, positions, seqs, [c.num_tokens for c in chunks], all_logits)
        for chunk in chunks:
            self.cache.mark_computed(chunk.seq, chunk.seq.num_computed + chunk.num_tokens)
        return logits

    def _forward(
        self, ids: list[int], positions: list[int], seqs: list[Sequence], num_queries: list[int], all_logits: bool
    ) -> torch.Tensor:
        """The PyTorch model over the step's tokens."""
        batch = build_batch(seqs, num_queries, self.cache.block_size, self.device, self.paged_slots)
        if all_logits or len(ids) == len(seqs):  # every token's logits (e.g. an all-decode step)
            rows = slice(None)
        else:
            rows = torch.tensor(num_queries, device=self.device).cumsum(0) - 1
        ids_and_positions = torch.tensor([ids, positions], device=self.device)  # one host-to-device copy
        return self.model(ids_and_positions[0], ids_and_positions[1], batch, self.kv, rows)
