"""The tree-structured paged KV cache of one replica.

Sequences form a tree: `fork` gives n children that share every full block of their
parent and each get a private copy of its partially filled last block; `merge` builds
one sequence out of a parent and its children by concatenating block lists, copying no
K/V. Each token of a sequence has a slot (where its K/V lives) and a position (what
RoPE sees); the two are separate because a merged sequence's positions are those the
protocol wants, not its slot order.

    parent   [b0 b1 b2 t ]            t: partial tail, b*: full blocks (refcount 3)
    child 1  [b0 b1 b2 t1 c1 ...]     t1, t2: copies of t, written on from there
    child 2  [b0 b1 b2 t2 c2 ...]
    merged   [b0 b1 b2 t  t1' c1 ... t2' c2 ...]   (t1', t2': only the children's own slots)

Layout of a non-merged sequence: token i sits in block `blocks[i // block_size]` at
offset `i % block_size`, at position i; only such sequences feed the prefix index.
Every method that takes blocks checks first and raises `OutOfBlocks` before changing
anything, so a failed call leaves the cache as it was.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from cache_service.block_pool import BlockPool, OutOfBlocks
from cache_service.config import CacheConfig
from cache_service.prefix_index import NO_PARENT, PrefixIndex


@dataclass(slots=True)
class Sequence:
    seq_id: int
    token_ids: list[int]
    positions: list[int]
    slots: list[int]  # physical slot of each token
    blocks: list[int]  # blocks this sequence holds a reference to, each once, in slot order
    next_position: int  # position of the next appended token: max(positions) + 1
    num_computed: int = 0  # leading tokens whose K/V has been written
    num_cached_tokens: int = 0  # leading tokens found in the prefix index when allocated
    block_keys: list[int] = field(default_factory=list)  # prefix keys of leading full blocks
    standard_layout: bool = True  # token i at slot-in-block i and position i

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True, frozen=True)
class KVSlice:
    """K/V of a run of tokens, detached from any pool: what moves between replicas."""

    token_ids: list[int]
    positions: list[int]
    k: torch.Tensor  # (num_layers, num_tokens, num_kv_heads, head_dim)
    v: torch.Tensor  # (num_layers, num_tokens, num_kv_heads, head_dim)


@dataclass(slots=True, frozen=True)
class CacheStats:
    total_blocks: int
    free_blocks: int
    used_blocks: int  # held by at least one sequence
    cached_blocks: int  # held by none, kept for prefix reuse, evictable
    shared_blocks: int  # held by more than one sequence
    branch_blocks: int  # held by exactly one sequence
    bytes_per_block: int
    prefix_hit_tokens: int  # tokens whose K/V was reused instead of recomputed, so far
    blocks_copied: int  # blocks copied by fork, so far
    live_sequences: int

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.bytes_per_block

    @property
    def shared_bytes(self) -> int:
        return self.shared_blocks * self.bytes_per_block

    @property
    def branch_bytes(self) -> int:
        return self.branch_blocks * self.bytes_per_block


class KVCache:
    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.block_size = config.block_size
        self.pool = BlockPool(config)
        self.index = PrefixIndex()
        self.sequences: dict[int, Sequence] = {}
        self.prefix_hit_tokens = 0
        self._ids = itertools.count()

    # ---- capacity -------------------------------------------------------------------

    @property
    def num_available_blocks(self) -> int:
        """Blocks a caller can get now: free ones plus cached ones that can be evicted."""
        return self.pool.num_free + self.index.num_evictable

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether `allocate` of that many tokens succeeds even with no prefix hit."""
        return self.blocks_for(num_tokens) <= self.num_available_blocks

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self._blocks_to_append(seq, num_tokens) <= self.num_available_blocks

    def can_fork(self, seq: Sequence, num_children: int) -> bool:
        return self._tail_room(seq, exclusive=False) == 0 or num_children <= self.num_available_blocks

    # ---- sequence lifecycle ---------------------------------------------------------

    def allocate(self, token_ids: list[int]) -> Sequence:
        """A new root sequence holding slots for `token_ids` at positions 0..n-1.

        Leading full blocks found in the prefix index are shared, not recomputed:
        `seq.num_cached_tokens` (= `seq.num_computed`) says how many tokens need no
        prefill. The last token is never taken from the index, so its logits are
        always computed.
        """
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        token_ids = list(token_ids)
        hits, keys = self._find_prefix(token_ids)
        needed = self.blocks_for(len(token_ids)) - len(hits)
        available = self.num_available_blocks - sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if needed > available:
            raise OutOfBlocks(needed, available)
        for block in hits:
            self._hold(block)
        blocks = hits + [self._new_block() for _ in range(needed)]
        num_cached = len(hits) * self.block_size
        self.prefix_hit_tokens += num_cached
        seq = Sequence(
            seq_id=next(self._ids),
            token_ids=token_ids,
            positions=list(range(len(token_ids))),
            slots=[blocks[i // self.block_size] * self.block_size + i % self.block_size for i in range(len(token_ids))],
            blocks=blocks,
            next_position=len(token_ids),
            num_computed=num_cached,
            num_cached_tokens=num_cached,
            block_keys=keys,
        )
        self.sequences[seq.seq_id] = seq
        return seq

    def append(self, seq: Sequence, token_ids: list[int], positions: list[int] | None = None) -> list[int]:
        """Give `token_ids` slots at the end of `seq`; returns those slots.

        Positions default to continuing after the sequence's highest position.
        """
        n = len(token_ids)
        if positions is None:
            positions = list(range(seq.next_position, seq.next_position + n))
        elif len(positions) != n:
            raise ValueError(f"{n} tokens but {len(positions)} positions")
        needed = self._blocks_to_append(seq, n)
        if needed > self.num_available_blocks:
            raise OutOfBlocks(needed, self.num_available_blocks)
        new_slots: list[int] = []
        room = self._tail_room(seq, exclusive=True)
        # A shared, partly filled last block is left as it is: the new tokens start a
        # fresh block, which leaves a hole, so the layout is no longer standard.
        standard = room == self._tail_room(seq, exclusive=False) and positions == list(range(len(seq), len(seq) + n))
        first = seq.slots[-1] + 1 if room else 0
        new_slots.extend(range(first, first + min(room, n)))
        while len(new_slots) < n:
            block = self._new_block()
            seq.blocks.append(block)
            start = block * self.block_size
            new_slots.extend(range(start, start + min(self.block_size, n - len(new_slots))))
        seq.standard_layout = seq.standard_layout and standard
        seq.token_ids.extend(token_ids)
        seq.positions.extend(positions)
        seq.slots.extend(new_slots)
        if positions:
            seq.next_position = max(seq.next_position, max(positions) + 1)
        return new_slots

    def mark_computed(self, seq: Sequence, num_computed: int) -> None:
        """The first `num_computed` tokens of `seq` have their K/V written.

        Newly complete full blocks of a standard-layout sequence enter the prefix index,
        so later requests (and later forks) with the same prefix reuse them.
        """
        if not seq.num_computed <= num_computed <= len(seq):
            raise ValueError(f"num_computed {num_computed} outside [{seq.num_computed}, {len(seq)}]")
        seq.num_computed = num_computed
        if not (seq.standard_layout and self.config.enable_prefix_cache):
            return
        bs = self.block_size
        for i in range(len(seq.block_keys), num_computed // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent_key = seq.block_keys[-1] if seq.block_keys else NO_PARENT
            seq.block_keys.append(self.index.insert(parent_key, tokens, seq.blocks[i]))

    def fork(self, seq: Sequence, num_children: int) -> list[Sequence]:
        """`num_children` children of `seq`, each continuing its context.

        Full blocks are shared (refcount + 1 each); a partially filled last block is
        copied once per child so each child writes its own. No other K/V moves.
        """
        if num_children < 1:
            raise ValueError("fork needs at least one child")
        if seq.num_computed != len(seq):
            raise ValueError(f"fork of sequence {seq.seq_id} before its K/V is written")
        copy_tail = self._tail_room(seq, exclusive=False) > 0
        if copy_tail and num_children > self.num_available_blocks:
            raise OutOfBlocks(num_children, self.num_available_blocks)
        bs, tail = self.block_size, seq.blocks[-1]
        children = []
        for _ in range(num_children):
            blocks, slots = list(seq.blocks), list(seq.slots)
            if copy_tail:
                copy = self._new_block()
                self.pool.copy_block(tail, copy)
                blocks[-1] = copy
                slots = [(copy - tail) * bs + s if s // bs == tail else s for s in slots]
            for block in blocks[: len(blocks) - copy_tail]:
                self._hold(block)
            child = Sequence(
                seq_id=next(self._ids),
                token_ids=list(seq.token_ids),
                positions=list(seq.positions),
                slots=slots,
                blocks=blocks,
                next_position=seq.next_position,
                num_computed=len(seq),
                block_keys=list(seq.block_keys),
                standard_layout=seq.standard_layout,
            )
            self.sequences[child.seq_id] = child
            children.append(child)
        return children

    def merge(self, parent: Sequence, children: list[Sequence]) -> Sequence:
        """One sequence: the parent's tokens, then each child's own tokens, in order.

        Block lists are concatenated (refcount + 1 each), no K/V is copied. Every token
        keeps the position it was computed at; tokens appended later continue after the
        highest position (for Multiverse: after the longest path).
        """
        p = len(parent)
        token_ids, positions, slots = list(parent.token_ids), list(parent.positions), list(parent.slots)
        blocks = list(parent.blocks)
        for child in children:
            if child.token_ids[:p] != parent.token_ids or child.num_computed != len(child):
                raise ValueError(f"sequence {child.seq_id} is not a fully computed fork of {parent.seq_id}")
            token_ids.extend(child.token_ids[p:])
            positions.extend(child.positions[p:])
            slots.extend(child.slots[p:])
            own_blocks = list(dict.fromkeys(s // self.block_size for s in child.slots[p:]))
            if set(own_blocks) & set(blocks):
                raise ValueError(f"sequence {child.seq_id} shares its own blocks with another merged part")
            blocks.extend(own_blocks)
        for block in blocks:
            self._hold(block)
        merged = Sequence(
            seq_id=next(self._ids),
            token_ids=token_ids,
            positions=positions,
            slots=slots,
            blocks=blocks,
            next_position=max([parent.next_position] + [c.next_position for c in children]),
            num_computed=len(token_ids),
            block_keys=list(parent.block_keys),
            standard_layout=parent.standard_layout and len(token_ids) == p,
        )
        self.sequences[merged.seq_id] = merged
        return merged

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody holds become cached or free."""
        if self.sequences.pop(seq.seq_id, None) is None:
            raise KeyError(f"sequence {seq.seq_id} is not live in this cache")
        # Deepest blocks first, so LRU eviction takes leaves before the prefixes they hang off.
        for block in reversed(seq.blocks):
            self.pool.ref_counts[block] -= 1
            if self.pool.ref_counts[block] == 0:
                if block in self.index:
                    self.index.mark_evictable(block)
                else:
                    self.pool.give_free(block)
        seq.blocks = []

    # ---- moving K/V ------------------------------------------------------------------

    def write(self, seq: Sequence, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V `(num_layers, n, num_kv_heads, head_dim)` for tokens start..start+n."""
        slots = torch.tensor(seq.slots[start : start + k.shape[1]], device=self.config.device)
        flat_shape = (self.config.num_layers, -1, self.config.num_kv_heads, self.config.head_dim)
        self.pool.k.view(flat_shape)[:, slots] = k.to(self.config.dtype)
        self.pool.v.view(flat_shape)[:, slots] = v.to(self.config.dtype)

    def export_blocks(self, seq: Sequence, start: int, end: int) -> KVSlice:
        """A copy of the K/V of tokens start..end of `seq`, for another replica."""
        if not 0 <= start <= end <= seq.num_computed:
            raise ValueError(f"export range [{start}, {end}) outside computed tokens [0, {seq.num_computed})")
        slots = torch.tensor(seq.slots[start:end], device=self.config.device)
        flat_shape = (self.config.num_layers, -1, self.config.num_kv_heads, self.config.head_dim)
        return KVSlice(
            token_ids=seq.token_ids[start:end],
            positions=seq.positions[start:end],
            k=self.pool.k.view(flat_shape).index_select(1, slots),
            v=self.pool.v.view(flat_shape).index_select(1, slots),
        )

    def import_blocks(self, kv: KVSlice) -> Sequence:
        """A new root sequence holding `kv`'s tokens, K/V written, full blocks indexed.

        Blocks already in this cache's prefix index are shared rather than rewritten.
        """
        if kv.positions != list(range(len(kv.token_ids))):
            raise ValueError("only a prefix starting at position 0 can be imported")
        seq = self.allocate(kv.token_ids)
        start = seq.num_cached_tokens
        self.write(seq, start, kv.k[:, start:], kv.v[:, start:])
        self.mark_computed(seq, len(seq))
        return seq

    # ---- accounting ------------------------------------------------------------------

    def stats(self) -> CacheStats:
        refs = self.pool.ref_counts
        return CacheStats(
            total_blocks=self.config.num_blocks,
            free_blocks=self.pool.num_free,
            used_blocks=sum(1 for r in refs if r > 0),
            cached_blocks=self.index.num_evictable,
            shared_blocks=sum(1 for r in refs if r > 1),
            branch_blocks=sum(1 for r in refs if r == 1),
            bytes_per_block=self.config.bytes_per_block,
            prefix_hit_tokens=self.prefix_hit_tokens,
            blocks_copied=self.pool.blocks_copied,
            live_sequences=len(self.sequences),
        )

    def check_integrity(self) -> None:
        """Assert free + used + cached == total and refcounts match the sequences."""
        holders = [0] * self.config.num_blocks
        bs = self.block_size
        for seq in self.sequences.values():
            assert len(seq.token_ids) == len(seq.positions) == len(seq.slots), f"seq {seq.seq_id} lengths differ"
            assert len(set(seq.blocks)) == len(seq.blocks), f"seq {seq.seq_id} holds a block twice"
            assert {s // bs for s in seq.slots} <= set(seq.blocks), f"seq {seq.seq_id} uses an unheld block"
            assert len(set(seq.slots)) == len(seq.slots), f"seq {seq.seq_id} uses a slot twice"
            for block in seq.blocks:
                holders[block] += 1
        assert holders == self.pool.ref_counts, "refcounts differ from the sequences holding the blocks"
        free = set(self.pool.free_blocks)
        assert len(free) == self.pool.num_free, "a block is on the free list twice"
        used = {b for b, r in enumerate(holders) if r > 0}
        assert not free & used, "a held block is on the free list"
        assert not free & set(self.index.key_by_block), "an indexed block is on the free list"
        self.index.check_integrity(self.pool.ref_counts)
        stats = self.stats()
        assert stats.free_blocks + stats.used_blocks + stats.cached_blocks == stats.total_blocks, stats

    # ---- internals -------------------------------------------------------------------

    def _find_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Indexed blocks (and their keys) covering full blocks before the last token."""
        hits: list[int] = []
        keys: list[int] = []
        if not self.config.enable_prefix_cache:
            return hits, keys
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            hit = self.index.lookup(keys[-1] if keys else NO_PARENT, tuple(token_ids[i * bs : (i + 1) * bs]))
            if hit is None:
                break
            hits.append(hit[0])
            keys.append(hit[1])
        return hits, keys

    def _tail_room(self, seq: Sequence, exclusive: bool) -> int:
        """Unused slots after the sequence's last slot in its last block.

        With `exclusive`, only if nobody else holds that block (so writing there is safe).
        """
        if not seq.slots or (exclusive and self.pool.ref_counts[seq.blocks[-1]] != 1):
            return 0
        return self.block_size - 1 - seq.slots[-1] % self.block_size

    def _blocks_to_append(self, seq: Sequence, num_tokens: int) -> int:
        return self.blocks_for(max(0, num_tokens - self._tail_room(seq, exclusive=True)))

    def _new_block(self) -> int:
        """A block with refcount 1: a free one, else the least recently used cached one."""
        if self.pool.num_free:
            return self.pool.take_free()
        block = self.index.evict()
        self.pool.ref_counts[block] = 1
        return block

    def _hold(self, block: int) -> None:
        if self.pool.ref_counts[block] == 0:
            self.index.mark_in_use(block)
        self.pool.ref_counts[block] += 1
