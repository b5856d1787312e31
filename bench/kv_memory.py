"""KV bytes held by a 16-way fork: Braid's tree cache vs the ideal vs copying the prefix.

Workload: a prefix of P tokens, forked into 16 children that each write 128 tokens.
- braid: one KVCache; the prefix is allocated once and forked (shared full blocks,
  copied partial tail), each child appends its own tokens.
- copy: the peer layout of serving each thread as an independent request with no
  prefix sharing (a second KVCache with the prefix index off): 16 sequences of P + 128.
- ideal: every distinct token stored once, rounded up to whole blocks.
Both caches are real pools; the numbers are read from their own accounting.
The last line is JSON (issue's workload P=512, worst case over the model configs).
"""

from __future__ import annotations

import json

import torch

from cache_service import CacheConfig, KVCache

CHILDREN, CHILD_TOKENS, BLOCK = 16, 128, 16
MODELS = {
    # The embedded Countdown model's size class (~3M params, Llama, fp32 on CPU).
    "embedded-3M": dict(num_layers=4, num_kv_heads=4, head_dim=32, dtype=torch.float32),
    # Llama-2-7B: 32 layers, 32 KV heads of 128, fp16.
    "llama-7B": dict(num_layers=32, num_kv_heads=32, head_dim=128, dtype=torch.float16),
}


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


def braid_fork(model: dict, prefix: int) -> tuple[int, int]:
    """(bytes held at the peak, blocks copied by fork) for the tree cache."""
    num_blocks = blocks_for(prefix) + CHILDREN * blocks_for(prefix % BLOCK + CHILD_TOKENS)
    cache = KVCache(CacheConfig(num_blocks=num_blocks, block_size=BLOCK, **model))
    parent = cache.allocate(list(range(prefix)))
    cache.mark_computed(parent, prefix)
    for i, child in enumerate(cache.fork(parent, CHILDREN)):
        cache.append(child, [1000 + i] * CHILD_TOKENS)
        cache.mark_computed(child, len(child))
    cache.check_integrity()
    stats = cache.stats()
    return stats.used_bytes, stats.blocks_copied


def copy_per_child(model: dict, prefix: int) -> int:
    """Bytes held when each child is an independent sequence with its own prefix copy."""
    cfg = CacheConfig(
        num_blocks=CHILDREN * blocks_for(prefix + CHILD_TOKENS), block_size=BLOCK, enable_prefix_cache=False, **model
    )
    cache = KVCache(cfg)
    for i in range(CHILDREN):
        cache.allocate(list(range(prefix)) + [1000 + i] * CHILD_TOKENS)
    return cache.stats().used_bytes


def main() -> None:
    rows = []
    for name, model in MODELS.items():
        bytes_per_block = CacheConfig(num_blocks=1, block_size=BLOCK, **model).bytes_per_block
        for prefix in (512, 520):
            held, copied = braid_fork(model, prefix)
            ideal = blocks_for(prefix + CHILDREN * CHILD_TOKENS) * bytes_per_block
            copy = copy_per_child(model, prefix)
            rows.append(
                dict(
                    model=name,
                    prefix=prefix,
                    held_mib=held / 2**20,
                    ideal_mib=ideal / 2**20,
                    copy_mib=copy / 2**20,
                    held_over_ideal=held / ideal,
                    copy_over_ideal=copy / ideal,
                    copied_per_child_per_layer=copied / CHILDREN,
                )
            )
    header = f"{'model':<12} {'prefix':>6} {'held MiB':>9} {'ideal MiB':>9} {'copy MiB':>9} "
    header += f"{'held/ideal':>10} {'copy/ideal':>10} {'fork copies/child/layer':>24}"
    print(f"fork into {CHILDREN} children x {CHILD_TOKENS} tokens, block size {BLOCK}")
    print(header)
    for r in rows:
        print(
            f"{r['model']:<12} {r['prefix']:>6} {r['held_mib']:>9.1f} {r['ideal_mib']:>9.1f} {r['copy_mib']:>9.1f} "
            f"{r['held_over_ideal']:>10.3f} {r['copy_over_ideal']:>10.3f} {r['copied_per_child_per_layer']:>24.2f}"
        )
    main_rows = [r for r in rows if r["prefix"] == 512]
    print(
        json.dumps(
            {
                "bench": "kv_memory",
                "held_over_ideal": max(r["held_over_ideal"] for r in main_rows),
                "copy_over_ideal": min(r["copy_over_ideal"] for r in main_rows),
                "fork_copied_blocks_per_child_per_layer": max(r["copied_per_child_per_layer"] for r in rows),
                "held_over_ideal_unaligned_prefix": max(r["held_over_ideal"] for r in rows if r["prefix"] != 512),
            }
        )
    )


if __name__ == "__main__":
    main()
