"""Unit tests of the tree-structured KV cache: each operation, its errors, its accounting."""

from __future__ import annotations

import pytest
import torch

import cache_service.prefix_index as prefix_index
from cache_service import CacheConfig, KVCache, OutOfBlocks, Sequence

LAYERS, HEADS, DIM, BS = 2, 2, 4, 4


def make_cache(num_blocks: int = 32, **kwargs: object) -> KVCache:
    return KVCache(CacheConfig(LAYERS, HEADS, DIM, num_blocks=num_blocks, block_size=BS, **kwargs))


def computed(cache: KVCache, tokens: list[int]) -> Sequence:
    """A sequence whose K/V for every token is written: token t at any slot holds value t."""
    seq = cache.allocate(tokens)
    write_values(cache, seq, seq.num_computed)
    return seq


def write_values(cache: KVCache, seq: Sequence, start: int) -> None:
    values = torch.tensor(seq.token_ids[start:], dtype=torch.float32)
    k = values.view(1, -1, 1, 1).expand(LAYERS, -1, HEADS, DIM)
    cache.write(seq, start, k, -k)
    cache.mark_computed(seq, len(seq))


def read_values(cache: KVCache, seq: Sequence) -> list[float]:
    kv = cache.export_blocks(seq, 0, len(seq))
    assert torch.equal(kv.v, -kv.k)
    return kv.k[0, :, 0, 0].tolist()


def test_config_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="block_size"):
        CacheConfig(2, 2, 4, num_blocks=8, block_size=0)
    assert CacheConfig(2, 2, 4, num_blocks=8).bytes_per_block == 16 * 2 * 2 * 2 * 4 * 4


def test_allocate_lays_tokens_out_in_blocks() -> None:
    cache = make_cache()
    seq = cache.allocate(list(range(10)))
    assert len(seq.blocks) == 3
    assert seq.slots == [seq.blocks[i // BS] * BS + i % BS for i in range(10)]
    assert seq.positions == list(range(10)) and seq.next_position == 10
    assert seq.num_computed == 0
    with pytest.raises(ValueError, match="at least one token"):
        cache.allocate([])
    cache.check_integrity()


def test_fork_shares_full_blocks_and_copies_only_the_tail() -> None:
    cache = make_cache()
    parent = computed(cache, list(range(10)))  # blocks: full, full, tail of 2
    children = cache.fork(parent, 3)
    stats = cache.stats()
    assert stats.blocks_copied == 3  # one tail copy per child
    assert stats.shared_blocks == 2 and stats.branch_blocks == 1 + 3
    for child in children:
        assert child.blocks[:2] == parent.blocks[:2]
        assert child.blocks[2] != parent.blocks[2]
        assert read_values(cache, child) == list(range(10))
    cache.check_integrity()


def test_fork_of_block_aligned_sequence_copies_nothing() -> None:
    cache = make_cache()
    parent = computed(cache, list(range(8)))
    cache.fork(parent, 4)
    assert cache.stats().blocks_copied == 0
    assert all(cache.pool.ref_counts[b] == 5 for b in parent.blocks)


def test_fork_needs_written_kv() -> None:
    cache = make_cache()
    seq = cache.allocate([1, 2, 3])
    with pytest.raises(ValueError, match="before its K/V is written"):
        cache.fork(seq, 2)


def test_children_write_their_own_branch() -> None:
    cache = make_cache()
    parent = computed(cache, [1, 2, 3, 4, 5, 6])
    a, b = cache.fork(parent, 2)
    for child, tokens in ((a, [10, 11, 12]), (b, [20, 21, 22, 23, 24])):
        cache.append(child, tokens)
        write_values(cache, child, 6)
    assert read_values(cache, parent) == [1, 2, 3, 4, 5, 6]
    assert read_values(cache, a) == [1, 2, 3, 4, 5, 6, 10, 11, 12]
    assert read_values(cache, b) == [1, 2, 3, 4, 5, 6, 20, 21, 22, 23, 24]
    cache.check_integrity()


def test_append_fills_the_last_block_before_taking_a_new_one() -> None:
    cache = make_cache()
    seq = cache.allocate([1, 2, 3])
    slots = cache.append(seq, [4])
    assert slots == [seq.blocks[0] * BS + 3] and len(seq.blocks) == 1
    cache.append(seq, [5, 6])
    assert len(seq.blocks) == 2 and seq.positions == [0, 1, 2, 3, 4, 5]
    cache.append(seq, [7], positions=[40])
    assert seq.next_position == 41 and not seq.standard_layout
    with pytest.raises(ValueError, match="positions"):
        cache.append(seq, [8, 9], positions=[1])


def test_free_returns_every_block() -> None:
    cache = make_cache(enable_prefix_cache=False)
    parent = computed(cache, list(range(9)))
    children = cache.fork(parent, 2)
    for seq in [*children, parent]:
        cache.free(seq)
    cache.check_integrity()
    assert cache.stats().used_blocks == 0 and cache.stats().free_blocks == 32
    with pytest.raises(KeyError):
        cache.free(parent)


def test_merge_concatenates_blocks_without_copying() -> None:
    cache = make_cache()
    parent = computed(cache, [1, 2, 3, 4, 5, 6])
    a, b = cache.fork(parent, 2)
    cache.append(a, [10, 11, 12, 13, 14])
    write_values(cache, a, 6)
    cache.append(b, [20, 21])
    write_values(cache, b, 6)
    copied = cache.stats().blocks_copied
    merged = cache.merge(parent, [a, b])
    assert cache.stats().blocks_copied == copied
    assert read_values(cache, merged) == [1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 20, 21]
    # Each path keeps its positions; what follows starts after the longest path.
    assert merged.positions == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 6, 7]
    assert merged.next_position == 11
    for seq in (parent, a, b):
        cache.free(seq)
    # The merged sequence alone keeps the blocks alive.
    assert read_values(cache, merged) == [1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 20, 21]
    cache.append(merged, [30])
    write_values(cache, merged, 13)
    assert merged.positions[-1] == 11
    cache.check_integrity()


def test_append_after_merge_leaves_the_childs_block_alone() -> None:
    cache = make_cache()
    parent = computed(cache, [1, 2, 3, 4])
    (child,) = cache.fork(parent, 1)
    cache.append(child, [5, 6])
    write_values(cache, child, 4)
    merged = cache.merge(parent, [child])
    cache.append(merged, [7])  # child still holds its partial block: start a fresh one
    write_values(cache, merged, 6)
    assert merged.slots[-1] // BS not in child.blocks
    assert read_values(cache, child) == [1, 2, 3, 4, 5, 6]
    assert read_values(cache, merged) == [1, 2, 3, 4, 5, 6, 7]
    assert not merged.standard_layout
    cache.check_integrity()


def test_merge_rejects_foreign_or_repeated_children() -> None:
    cache = make_cache()
    parent = computed(cache, [1, 2, 3, 4, 5])
    (child,) = cache.fork(parent, 1)
    cache.append(child, [9])
    write_values(cache, child, 5)
    stranger = computed(cache, [7, 7, 7, 7, 7, 7])
    with pytest.raises(ValueError, match="not a fully computed fork"):
        cache.merge(parent, [stranger])
    with pytest.raises(ValueError, match="shares its own blocks"):
        cache.merge(parent, [child, child])
    cache.check_integrity()


def test_prefix_index_reuses_full_blocks_of_a_finished_request() -> None:
    cache = make_cache()
    first = computed(cache, list(range(1, 12)))
    first_blocks = list(first.blocks)
    cache.free(first)
    assert cache.stats().cached_blocks == 2
    again = cache.allocate(list(range(1, 12)))
    assert again.num_cached_tokens == 8 and again.blocks[:2] == first_blocks[:2]
    diverging = cache.allocate([1, 2, 3, 4, 99, 6, 7, 8, 9])
    assert diverging.num_cached_tokens == 4
    # The last token is never served from the index: its logits must be computed.
    exact = cache.allocate(list(range(1, 9)))
    assert exact.num_cached_tokens == 4
    assert cache.stats().prefix_hit_tokens == 16
    cache.check_integrity()


def test_prefix_hit_is_verified_by_tokens_not_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefix_index, "block_key", lambda parent, tokens: 0)  # every key collides
    cache = make_cache()
    cache.free(computed(cache, [1, 2, 3, 4, 5]))
    assert cache.allocate([9, 9, 9, 9, 5]).num_cached_tokens == 0
    assert cache.allocate([1, 2, 3, 4, 5]).num_cached_tokens == 4


def test_children_fill_blocks_that_a_later_fork_reuses() -> None:
    cache = make_cache()
    parent = computed(cache, [1, 2, 3, 4, 5, 6])
    (child,) = cache.fork(parent, 1)
    cache.append(child, [7, 8, 9])
    write_values(cache, child, 6)
    later = cache.allocate([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert later.num_cached_tokens == 8


def test_eviction_takes_least_recently_used_cached_blocks() -> None:
    cache = make_cache(num_blocks=4)
    old = computed(cache, [1, 2, 3, 4, 0])
    new = computed(cache, [5, 6, 7, 8, 0])
    cache.free(old)
    cache.free(new)
    assert cache.stats().cached_blocks == 2 and cache.stats().free_blocks == 2
    filler = cache.allocate([9] * 12)  # 3 blocks: 2 free + evict the oldest cached one
    assert cache.stats().cached_blocks == 1
    cache.free(filler)
    assert cache.allocate([5, 6, 7, 8, 0]).num_cached_tokens == 4
    cache.check_integrity()


def test_running_out_is_a_typed_error_that_changes_nothing() -> None:
    cache = make_cache(num_blocks=4)
    seq = computed(cache, list(range(14)))  # 4 blocks, last holds 2
    before = (cache.stats(), list(cache.pool.ref_counts), list(seq.slots))
    assert not cache.can_allocate(1)
    with pytest.raises(OutOfBlocks) as err:
        cache.allocate([1])
    assert err.value.needed == 1 and err.value.available == 0
    assert cache.can_append(seq, 2) and not cache.can_append(seq, 3)
    with pytest.raises(OutOfBlocks):
        cache.append(seq, [1, 2, 3])
    assert not cache.can_fork(seq, 1)
    with pytest.raises(OutOfBlocks):
        cache.fork(seq, 1)
    assert (cache.stats(), list(cache.pool.ref_counts), list(seq.slots)) == before
    cache.check_integrity()


def test_export_import_round_trip_is_bit_exact() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        sender, receiver = make_cache(dtype=dtype), make_cache(dtype=dtype)
        seq = sender.allocate(list(range(13)))
        k = torch.randn(LAYERS, 13, HEADS, DIM)
        sender.write(seq, 0, k, k * 2)
        sender.mark_computed(seq, 13)
        sent = sender.export_blocks(seq, 0, 13)
        received = receiver.import_blocks(sent)
        back = receiver.export_blocks(received, 0, 13)
        assert torch.equal(back.k, sent.k) and torch.equal(back.v, sent.v)
        assert torch.equal(back.k, k.to(dtype))
        # Full blocks entered the receiver's index: a fork request with this prefix hits.
        assert receiver.allocate([*list(range(13)), 99]).num_cached_tokens == 12
        receiver.check_integrity()


def test_export_refuses_uncomputed_tokens() -> None:
    cache = make_cache()
    seq = cache.allocate([1, 2, 3])
    with pytest.raises(ValueError, match="outside computed"):
        cache.export_blocks(seq, 0, 3)
