"""Moving a prefix's KV between replicas over `torch.distributed`: NCCL on GPUs, gloo on CPUs.

A `KVSlice` (from `KVCache.export_blocks`) goes point to point: first a small header
(token count), then token ids and positions, then K and V as they sit in the cache's
dtype, so what arrives is bit-exact. Each transfer has its own tag, so several can be in
flight between the same two replicas with gloo, which matches by tag (NCCL ignores tags:
there, concurrent transfers between one pair would need a stream each). The receiver
imports it with `KVCache.import_blocks`, which enters its full blocks into the prefix index: a second
fork from the same prefix finds them there and needs no second transfer.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cache_service.config import CacheConfig
from cache_service.kv_cache import KVSlice


@dataclass(slots=True, frozen=True)
class TransferStats:
    bytes: int
    seconds: float


def default_backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


class KVTransfer:
    """One replica's end of the process group that carries prefix KV."""

    def __init__(self, config: CacheConfig, rank: int, world: int, init_method: str, timeout_s: float = 60.0) -> None:
        """Join the process group (blocks until every rank has joined; a new group replaces an old one)."""
        self.config = config
        self.rank = rank
        self.backend = default_backend(config.device)
        if dist.is_initialized():
            dist.destroy_process_group()
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(self.backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)

    def send(self, kv: KVSlice, dst: int, tag: int = 0) -> TransferStats:
        start = time.perf_counter()
        device = self.config.device
        n = len(kv.token_ids)
        dist.send(torch.tensor([n], dtype=torch.int64, device=device), dst, tag=tag)
        dist.send(torch.tensor([kv.token_ids, kv.positions], dtype=torch.int64, device=device), dst, tag=tag)
        dist.send(kv.k.contiguous(), dst, tag=tag)
        dist.send(kv.v.contiguous(), dst, tag=tag)
        return TransferStats(2 * kv.k.numel() * kv.k.element_size() + 16 * n + 8, time.perf_counter() - start)

    def recv(self, src: int, tag: int = 0) -> tuple[KVSlice, TransferStats]:
        start = time.perf_counter()
        c = self.config
        header = torch.empty(1, dtype=torch.int64, device=c.device)
        dist.recv(header, src, tag=tag)
        n = int(header.item())
        ids = torch.empty((2, n), dtype=torch.int64, device=c.device)
        dist.recv(ids, src, tag=tag)
        shape = (c.num_layers, n, c.num_kv_heads, c.head_dim)
        k = torch.empty(shape, dtype=c.dtype, device=c.device)
        v = torch.empty(shape, dtype=c.dtype, device=c.device)
        dist.recv(k, src, tag=tag)
        dist.recv(v, src, tag=tag)
        kv = KVSlice(ids[0].tolist(), ids[1].tolist(), k, v)
        return kv, TransferStats(2 * k.numel() * k.element_size() + 16 * n + 8, time.perf_counter() - start)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this machine now (for a process group, an HTTP server, a test)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def free_address(host: str) -> str:
    return f"tcp://{host}:{free_port()}"
