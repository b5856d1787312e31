"""Braid across replicas: throughput of 2 replicas against 1, and prefix transfer against
recompute, with how often the placement cost model chose the faster path.

    python -m bench.cluster

1. Throughput: the same forking Countdown requests (the embedded model, ThreadWeaver,
   first_success, exact verifier; `--requests` test problems, 16 in flight) through a
   real local Ray cluster with 1 replica and then 2 (one core each). Peer: the
   1-replica cluster, same run.
2. Prefix transfer vs recompute, for prefixes of 256 tokens up to the model's context
   (2047 for the embedded model: a prompt leaves room for a token) on the embedded model
   and a larger random-weight config (~24M): transfer = a KV slice sent over gloo
   between two processes (the path replicas use); recompute = the receiving engine's
   prefill of the prefix. The cost model (`actors.placement.PrefixCost`) starts from a
   measured 256-token prefill and its default bandwidth guess and learns bandwidth from
   each transfer, as a replica does; its choice counts as correct when it picked the
   path that measured faster.
Prints tables, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import tempfile
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess
from pathlib import Path

import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.placement import PrefixCost
from cache_service.transfer import KVTransfer, free_port
from cluster.config import DEFAULT_MODEL, ClusterConfig, start
from countdown import problems
from countdown.traces import SERVE_OPTIONS
from countdown.traces import prompt as countdown_prompt
from engine.engine import Engine
from engine.sampling import SamplingParams

SIZES = [256, 512, 1024, 2048, 4096]  # each model's that fit its context, the last cut to fit
LARGER = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
)
OPTIONS = {**SERVE_OPTIONS, "max_total_tokens": 1200}


def throughput(replicas: int, prompts: list[str], in_flight: int) -> float:
    """Requests per second through a fresh cluster of `replicas` replicas."""
    coordinator = start(ClusterConfig(num_replicas=replicas, kv_cache_bytes=64 * 2**20, capacity=16))
    ray.get(coordinator.generate.remote(prompts[0], OPTIONS))  # warm-up
    start_s = time.perf_counter()
    pending, queue = [], list(prompts)
    while queue or pending:
        while queue and len(pending) < in_flight:
            pending.append(coordinator.generate.remote(queue.pop(), OPTIONS))
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    rate = len(prompts) / (time.perf_counter() - start_s)
    for index in range(replicas):
        ray.kill(ray.get(coordinator.replica.remote(index)))
    ray.kill(coordinator)
    return rate


def transfer_worker(rank: int, port: int, model: str, sizes: list[int], repeats: int, out: mp.Queue) -> None:
    """Rank 0 prefills each prefix and sends its KV; rank 1 receives and imports it (timed)."""
    torch.set_num_threads(1)
    engine = Engine(model, kv_cache_bytes=512 * 2**20)
    transfer = KVTransfer(engine.cache.config, rank, 2, f"tcp://127.0.0.1:{port}")
    vocab = engine.runner.model.args.vocab_size
    try:
        for n in sizes:
            ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            if rank == 0:
                thread = engine.add_thread(ids, SamplingParams(max_new_tokens=1))
                thread.keep_kv = True
                while engine.has_work():
                    engine.step()
                kv = engine.cache.export_blocks(thread.seq, 0, n)
                dist.barrier()  # the receiver's clock starts after the sender's prefill
                for tag in range(repeats):  # other token ids each time: the receiver's index never hits
                    transfer.send(replace(kv, token_ids=[(t + tag) % vocab for t in kv.token_ids]), 1, tag)
                engine.release(thread)
            else:
                times = []
                dist.barrier()
                for tag in range(repeats):
                    start_s = time.perf_counter()
                    kv, stats = transfer.recv(0, tag)
                    engine.cache.free(engine.cache.import_blocks(kv))
                    times.append(time.perf_counter() - start_s)
                out.put((n, statistics.median(times), stats.bytes))
    finally:
        transfer.close()


def transfer_times(model: str, sizes: list[int], repeats: int) -> dict[int, tuple[float, int]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=transfer_worker, args=(r, port, model, sizes, repeats, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in sizes:
            n, seconds, num_bytes = next_result(out, procs)
            results[n] = (seconds, num_bytes)
    finally:
        for p in procs:
            if len(results) < len(sizes):  # a worker died, or the driver stopped: the other waits at a barrier
                p.terminate()
            p.join(timeout=60)
    return results


def next_result(out: mp.Queue, procs: list[BaseProcess], timeout_s: float = 600.0) -> tuple[int, float, int]:
    """The next prefix size's timing; raises at once when a worker has died (its traceback is
    on stderr): the other would wait at its barrier for good."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            for rank, p in enumerate(procs):
                if p.exitcode not in (None, 0):
                    raise RuntimeError(
                        f"transfer worker {rank} exited with code {p.exitcode} (its traceback is above)"
                    ) from None
    raise TimeoutError(f"no transfer timing in {timeout_s:.0f} s")


def recompute_time(engine: Engine, n: int, repeats: int) -> float:
    vocab = engine.runner.model.args.vocab_size
    times = []
    for r in range(repeats):
        ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1000 * r + n)).tolist()
        start_s = time.perf_counter()
        engine.generate([ids], SamplingParams(max_new_tokens=1))
        times.append(time.perf_counter() - start_s)
    return statistics.median(times)


def prefix_paths(name: str, model: str, repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    engine = Engine(model, kv_cache_bytes=512 * 2**20)
    cost = PrefixCost()
    cost.observe_prefill(256, recompute_time(engine, 256, 1))  # what a replica measures at start
    sizes = sorted({min(n, engine.max_context - 1) for n in SIZES})  # a prompt leaves room for one token
    sent = transfer_times(model, sizes, repeats)
    rows = []
    for n in sizes:
        recompute_s = recompute_time(engine, n, repeats)
        transfer_s, num_bytes = sent[n]
        chose = "transfer" if cost.transfer_s(num_bytes) <= cost.recompute_s(n) else "recompute"
        faster = "transfer" if transfer_s <= recompute_s else "recompute"
        rows.append(dict(model=name, tokens=n, mib=num_bytes / 2**20, transfer_s=transfer_s,
                         recompute_s=recompute_s, chose=chose, faster=faster))  # fmt: skip
        cost.observe_transfer(num_bytes, transfer_s)  # learnt after the fact, as a replica does
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    prompts = [countdown_prompt(p) for p in problems.splits(0, 0, args.requests)["test"]]
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        one = throughput(1, prompts, args.in_flight)
        two = throughput(2, prompts, args.in_flight)
    finally:
        ray.shutdown()
    print(f"\nthroughput, {args.requests} forking Countdown requests, {args.in_flight} in flight")
    print(f"  1 replica : {one:.2f} req/s\n  2 replicas: {two:.2f} req/s   ratio {two / one:.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        larger = Path(tmp) / "larger"
        config = LlamaConfig(vocab_size=512, max_position_embeddings=8192, **LARGER)
        LlamaForCausalLM(config).save_pretrained(larger)
        rows = prefix_paths("embedded-3M", DEFAULT_MODEL, args.repeats) + prefix_paths("random-24M", str(larger), 3)
    print("\nprefix to another replica: transfer (gloo) vs recompute (prefill), median seconds")
    print(f"{'model':>12} {'tokens':>6} {'MiB':>7} {'transfer':>9} {'recompute':>9} {'chose':>9} {'faster':>9}")
    for r in rows:
        print(f"{r['model']:>12} {r['tokens']:>6} {r['mib']:>7.1f} {r['transfer_s']:>9.4f} {r['recompute_s']:>9.3f} "
              f"{r['chose']:>9} {r['faster']:>9}")  # fmt: skip
    correct = sum(r["chose"] == r["faster"] for r in rows) / len(rows)
    print(json.dumps({"bench": "cluster", "throughput_2r_over_1r": round(two / one, 3),
                      "placement_choice_correct": round(correct, 3), "throughput_1r_rps": round(one, 3),
                      "throughput_2r_rps": round(two, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
