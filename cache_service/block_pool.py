"""The preallocated K/V tensors of one replica and the reference counts of their blocks.

A block holds `block_size` consecutive slots; slot `s` lives in block `s // block_size`
at offset `s % block_size`. The pool only counts references: which sequence holds which
block is the business of `KVCache`.
"""

from __future__ import annotations

from collections import deque

import torch

from cache_service.config import CacheConfig


class OutOfBlocks(RuntimeError):
    """The pool cannot supply `needed` blocks; the scheduler should queue or preempt."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(
            f"KV cache needs {needed} free blocks but only {available} can be freed up; "
            "wait for running threads to finish, preempt one, or start with more num_blocks"
        )
        self.needed = needed
        self.available = available


class BlockPool:
    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        # (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        shape = (
            config.num_layers,
            config.num_blocks,
            config.block_size,
            config.num_kv_heads,
            config.head_dim,
        )
        self.k = torch.zeros(shape, dtype=config.dtype, device=config.device)
        self.v = torch.zeros(shape, dtype=config.dtype, device=config.device)
        self.ref_counts = [0] * config.num_blocks
        self.free_blocks: deque[int] = deque(range(config.num_blocks))
        self.blocks_copied = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def take_free(self) -> int:
        """Pop a block from the free list with refcount 1; the caller checked `num_free`."""
        block = self.free_blocks.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def give_free(self, block: int) -> None:
        assert self.ref_counts[block] == 0
        self.free_blocks.append(block)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy K and V of every layer from block `src` to block `dst`."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.blocks_copied += 1

    def flat_k(self, layer: int) -> torch.Tensor:
        """(num_slots, num_kv_heads, head_dim) view of one layer's keys."""
        return self.k[layer].view(-1, self.config.num_kv_heads, self.config.head_dim)

    def flat_v(self, layer: int) -> torch.Tensor:
        """(num_slots, num_kv_heads, head_dim) view of one layer's values."""
        return self.v[layer].view(-1, self.config.num_kv_heads, self.config.head_dim)
