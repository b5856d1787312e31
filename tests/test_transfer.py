"""Prefix KV moves between two processes over torch.distributed, bit-exact (gloo on CPU;
NCCL where two GPUs exist)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from bench.cluster import transfer_times
from cache_service import CacheConfig, KVCache
from cache_service.transfer import KVTransfer, free_port
from cluster.config import DEFAULT_MODEL


def config(device: str, dtype: torch.dtype) -> CacheConfig:
    return CacheConfig(
        num_layers=3, num_kv_heads=2, head_dim=8, num_blocks=64, block_size=8, dtype=dtype, device=device
    )


def prefix_kv(cfg: CacheConfig) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = 45  # five full blocks and a partial one
    k = torch.randn(cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim, generator=g)
    return list(range(100, 100 + n)), k.to(cfg.dtype), (2 * k).to(cfg.dtype)


def worker(rank: int, port: int, device_kind: str, dtype: torch.dtype, results: mp.Queue) -> None:
    device = f"cuda:{rank}" if device_kind == "cuda" else "cpu"
    cfg = config(device, dtype)
    cache = KVCache(cfg)
    transfer = KVTransfer(cfg, rank, 2, f"tcp://127.0.0.1:{port}")
    tokens, k, v = prefix_kv(cfg)
    try:
        if rank == 0:
            seq = cache.allocate(tokens)
            cache.write(seq, 0, k.to(device), v.to(device))
            cache.mark_computed(seq, len(seq))
            stats = transfer.send(cache.export_blocks(seq, 0, len(seq)), dst=1)
            results.put(("sent", stats.bytes))
        else:
            kv, stats = transfer.recv(src=0)
            seq = cache.import_blocks(kv)
            back = cache.export_blocks(seq, 0, len(seq))
            exact = torch.equal(back.k.cpu(), k) and torch.equal(back.v.cpu(), v) and back.token_ids == tokens
            hit = cache.allocate(tokens + [1]).num_cached_tokens  # the prefix is in the index now
            cache.check_integrity()
            results.put(("received", exact, hit, stats.bytes))
    finally:
        transfer.close()


def run_pair(device_kind: str, dtype: torch.dtype) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, device_kind, dtype, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"transfer worker exited with {p.exitcode}"
    out = {}
    for _ in range(2):
        item = results.get(timeout=5)
        out[item[0]] = item[1:]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_kv_over_gloo_is_bit_exact_and_indexed(dtype: torch.dtype) -> None:
    out = run_pair("cpu", dtype)
    exact, hit, received_bytes = out["received"]
    assert exact and hit == 40  # the 5 full blocks; the partial one is never shared
    assert received_bytes == out["sent"][0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_prefix_kv_over_nccl_is_bit_exact() -> None:
    out = run_pair("cuda", torch.bfloat16)
    assert out["received"][0]


def test_a_transferred_prefix_and_a_recomputed_one_give_the_same_logits(checkpoint) -> None:
    """A child placed on another replica: its prefix KV imported there (transfer) or prefilled
    there (recompute) — its logits are the same either way."""
    from engine.engine import Engine
    from engine.sampling import SamplingParams

    prefix = list(range(3, 3 + 37))  # four full blocks of 8 and a partial one
    child = prefix + [7, 8, 9]
    sender = Engine(checkpoint, kv_cache_bytes=8 * 2**20, block_size=8)
    parent = sender.add_thread(prefix, SamplingParams(max_new_tokens=1))
    parent.keep_kv = True
    while sender.has_work():
        sender.step()
    kv = sender.cache.export_blocks(parent.seq, 0, 32)  # the full blocks, as a replica sends them

    def child_logits(engine: Engine) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        engine.logits_processor = lambda threads, logits: seen.append(logits.clone()) or logits
        engine.generate([child], SamplingParams(max_new_tokens=1))
        return seen[0]

    receiver = Engine(checkpoint, kv_cache_bytes=8 * 2**20, block_size=8)
    receiver.cache.free(receiver.cache.import_blocks(kv))
    transferred = child_logits(receiver)
    assert receiver.cache.stats().prefix_hit_tokens == 32  # the child's prefill started after the imported blocks
    recomputed = child_logits(Engine(checkpoint, kv_cache_bytes=8 * 2**20, block_size=8))
    torch.testing.assert_close(transferred, recomputed, atol=1e-5, rtol=1e-5)


def test_the_prefix_bench_stops_at_once_when_a_transfer_worker_dies() -> None:
    """`bench.cluster`: a prefix longer than the model's context makes the sender raise; the
    bench says which worker died instead of waiting, with the receiver, at a barrier."""
    with pytest.raises(RuntimeError, match=r"transfer worker \d exited with code 1"):
        transfer_times(str(DEFAULT_MODEL), [10**6], 1)
