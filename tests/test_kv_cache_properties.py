"""Property test: any sequence of cache operations keeps the cache exact and leak-free.

A state machine allocates (with prefix reuse), appends, forks, merges, frees and runs
the pool short (so cached blocks get evicted and calls fail with OutOfBlocks). Every
token's K is written as a value determined by the tokens up to it, so a prefix hit must
return the same values; after every step each live sequence reads back exactly what it
expects, and `check_integrity()` holds. At the end, freeing everything leaves no block used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cache_service import CacheConfig, KVCache, OutOfBlocks, Sequence

LAYERS, HEADS, DIM, BS = 2, 1, 2, 4
T = TypeVar("T")
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # small vocab: many prefix hits


def value_of(prefix: list[int]) -> float:
    return float(hash(tuple(prefix)) % 1_000_003)  # exact in fp32


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = KVCache(CacheConfig(LAYERS, HEADS, DIM, num_blocks=24, block_size=BS))
        self.expected: dict[int, list[float]] = {}  # seq id -> K value of each token
        self.live: dict[int, Sequence] = {}
        self.fork_parent: dict[int, int] = {}  # child id -> parent id

    def _compute(self, seq: Sequence, expected: list[float]) -> None:
        """Write K/V for the uncomputed tokens of `seq`, as a model would."""
        start = seq.num_computed
        new = [value_of(seq.token_ids[: i + 1]) for i in range(start, len(seq))]
        k = torch.tensor(new).view(1, -1, 1, 1).expand(LAYERS, -1, HEADS, DIM)
        self.cache.write(seq, start, k, -k)
        self.cache.mark_computed(seq, len(seq))
        self.expected[seq.seq_id] = expected[:start] + new
        self.live[seq.seq_id] = seq

    def _unchanged_on_failure(self, op: Callable[[], T]) -> T | None:
        before = (self.cache.stats(), list(self.cache.pool.ref_counts))
        try:
            return op()
        except OutOfBlocks:
            assert (self.cache.stats(), list(self.cache.pool.ref_counts)) == before
            return None

    @rule(tokens=tokens_st)
    def allocate(self, tokens: list[int]) -> None:
        seq = self._unchanged_on_failure(lambda: self.cache.allocate(tokens))
        if seq is not None:
            hit = seq.num_cached_tokens
            self._compute(seq, [value_of(tokens[: i + 1]) for i in range(hit)])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    def append(self, data: st.DataObject, tokens: list[int]) -> None:
        seq = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if self._unchanged_on_failure(lambda: self.cache.append(seq, tokens)) is not None:
            self._compute(seq, self.expected[seq.seq_id])

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 4))
    def fork(self, data: st.DataObject, n: int) -> None:
        parent = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        children = self._unchanged_on_failure(lambda: self.cache.fork(parent, n)) or []
        for child in children:
            self.live[child.seq_id] = child
            self.expected[child.seq_id] = list(self.expected[parent.seq_id])
            self.fork_parent[child.seq_id] = parent.seq_id

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        parent = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        p = len(parent)
        candidates = [
            c
            for c, par in self.fork_parent.items()
            if par == parent.seq_id and c in self.live and self.live[c].token_ids[:p] == parent.token_ids
        ]
        chosen = data.draw(st.lists(st.sampled_from(candidates), unique=True)) if candidates else []
        children = [self.live[c] for c in chosen]
        merged = self.cache.merge(parent, children)
        self.live[merged.seq_id] = merged
        self.expected[merged.seq_id] = self.expected[parent.seq_id] + [
            v for c in children for v in self.expected[c.seq_id][p:]
        ]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq_id = data.draw(st.sampled_from(sorted(self.live)))
        self.cache.free(self.live.pop(seq_id))

    @invariant()
    def exact_and_consistent(self) -> None:
        self.cache.check_integrity()
        for seq_id, seq in self.live.items():
            k = self.cache.export_blocks(seq, 0, len(seq)).k
            assert k[0, :, 0, 0].tolist() == self.expected[seq_id], f"seq {seq_id} reads wrong K"

    def teardown(self) -> None:
        for seq in list(self.live.values()):
            self.cache.free(seq)
        self.cache.check_integrity()
        assert self.cache.stats().used_blocks == 0


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase
