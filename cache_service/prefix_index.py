"""Prefix reuse across sequences: full blocks found by chained hashes of their token ids.

A full block whose tokens sit at positions 0..n-1 of some sequence is keyed by
`hash((key of the previous block, its token ids))`, so a key names the whole prefix up
to and including that block. A hit is confirmed by comparing the previous block's key and
the token ids, never by the hash alone: walking a prompt block by block, each hit is
then exact. Blocks keep their key after their last holder frees them ("cached"); they stay
reusable until the pool runs short and evicts them, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict

NO_PARENT = -1


def block_key(parent_key: int, token_ids: tuple[int, ...]) -> int:
    return hash((parent_key, token_ids))


class PrefixIndex:
    def __init__(self) -> None:
        self.block_by_key: dict[int, int] = {}
        self.key_by_block: dict[int, int] = {}
        self.content_by_block: dict[int, tuple[int, tuple[int, ...]]] = {}  # (parent key, tokens)
        # Cached blocks (refcount 0, still indexed), least recently used first.
        self.evictable: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, block: int) -> bool:
        return block in self.key_by_block

    @property
    def num_evictable(self) -> int:
        return len(self.evictable)

    def lookup(self, parent_key: int, token_ids: tuple[int, ...]) -> tuple[int, int] | None:
        """(block, key) of the block holding `token_ids` right after the prefix `parent_key`."""
        key = block_key(parent_key, token_ids)
        block = self.block_by_key.get(key)
        if block is None or self.content_by_block[block] != (parent_key, token_ids):
            return None
        return block, key

    def insert(self, parent_key: int, token_ids: tuple[int, ...], block: int) -> int:
        """Index a newly filled block (unless an equal key is indexed already); returns its key."""
        key = block_key(parent_key, token_ids)
        if key not in self.block_by_key and block not in self.key_by_block:
            self.block_by_key[key] = block
            self.key_by_block[block] = key
            self.content_by_block[block] = (parent_key, token_ids)
        return key

    def mark_evictable(self, block: int) -> None:
        """The block's last holder let it go: keep it, evict it last among equals."""
        self.evictable[block] = None
        self.evictable.move_to_end(block)

    def mark_in_use(self, block: int) -> None:
        """A cached block was hit and is held again."""
        del self.evictable[block]

    def evict(self) -> int:
        """Drop the least recently used cached block from the index and return it."""
        block, _ = self.evictable.popitem(last=False)
        self.remove(block)
        return block

    def remove(self, block: int) -> None:
        key = self.key_by_block.pop(block)
        del self.block_by_key[key]
        del self.content_by_block[block]

    def check_integrity(self, ref_counts: list[int]) -> None:
        assert len(self.block_by_key) == len(self.key_by_block) == len(self.content_by_block)
        for block, key in self.key_by_block.items():
            assert self.block_by_key[key] == block, f"index maps key of block {block} elsewhere"
        cached = {b for b in self.key_by_block if ref_counts[b] == 0}
        assert cached == set(self.evictable), "evictable set differs from indexed blocks at refcount 0"
