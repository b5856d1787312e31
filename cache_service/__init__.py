"""Braid's tree-structured paged KV cache: one pool per replica, sequences as a tree."""

from cache_service.block_pool import BlockPool, OutOfBlocks
from cache_service.config import CacheConfig
from cache_service.kv_cache import CacheStats, KVCache, KVSlice, Sequence
from cache_service.prefix_index import PrefixIndex

__all__ = [
    "BlockPool",
    "CacheConfig",
    "CacheStats",
    "KVCache",
    "KVSlice",
    "OutOfBlocks",
    "PrefixIndex",
    "Sequence",
]
