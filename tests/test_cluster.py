"""Replicas and the coordinator on a real local Ray cluster: placement of requests and of
forked children, prefix KV sent between replicas, a replica killed mid-request, and the
batch job with resume."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from actors.placement import SENT_PREFIXES, ChildChoice, ChildPlacement, Placement, PrefixCost
from actors.replica import options_from_dict
from cluster.config import ClusterConfig, start
from cluster.job import run

MODEL = Path(__file__).resolve().parents[1] / "countdown" / "model"


def test_placement_prefers_the_least_loaded_then_the_prefix_home() -> None:
    placement = Placement(3)
    first = placement.choose("12 34 56 78>90\n")
    placement.started(first)
    second = placement.choose("1 2 3 4>10\n")
    assert second != first  # the busy replica is avoided
    placement.started(second)
    # Same prefix again, loads within the margin: back to where that prefix's KV is.
    assert placement.choose("12 34 56 78>90\n") == first
    placement.started(first)
    placement.started(first)
    assert placement.choose("12 34 56 78>90\n") != first  # too busy now: load wins


def test_children_stay_local_while_there_is_room_then_go_by_the_cheaper_prefix_path() -> None:
    place = ChildPlacement(0, capacity=2, cost=PrefixCost(bandwidth_bytes_s=1e9, latency_s=0.001, prefill_tokens_s=1e4))
    args = {"step_s": 0.05, "prefix_key": 7, "num_tokens": 1000, "num_bytes": 10**6}
    assert place.choose(1, {1: 0}, **args).replica is None  # room here
    choice = place.choose(3, {1: 5, 2: 0}, **args)
    assert (choice.replica, choice.prefix) == (2, "transfer")  # 2 ms to send vs 100 ms to recompute
    place.record(choice, 7, ready="its transfer")
    cached = place.choose(3, {1: 5, 2: 1}, **args)
    assert (cached.prefix, cached.ready) == ("cached", "its transfer")  # sent before: nothing moves
    slow_link = {**args, "num_bytes": 10**9, "prefix_key": 8}
    assert place.choose(5, {2: 0}, **slow_link).prefix == "recompute"  # 1 s to send vs 0.1 s
    assert place.choose(3, {1: 2, 2: 2}, **args).replica is None  # nobody has room: queue here
    not_worth_it = {**args, "step_s": 0.0001, "prefix_key": 9}
    assert place.choose(2, {1: 0}, **not_worth_it).replica is None  # the wait saved < the move
    # Under a latency budget: the 2 ms move is fine for a child with 1 s before its join, not with 4 ms.
    assert place.choose(3, {1: 5, 2: 0}, **{**args, "prefix_key": 10}, deadline_s=1.0).replica == 2
    assert place.choose(3, {1: 5, 2: 0}, **{**args, "prefix_key": 11}, deadline_s=0.004).replica is None


def test_a_replica_remembers_the_last_prefixes_it_sent() -> None:
    place = ChildPlacement(0, capacity=1)
    for key in range(SENT_PREFIXES + 1):
        place.record(ChildChoice(1, "transfer"), key)
    assert place.how(1, 1, 10, 10).prefix == "cached"
    assert place.how(1, 0, 10, 10).prefix != "cached"  # the oldest is forgotten: sent again if needed
    place.record(ChildChoice(1, "transfer"), SENT_PREFIXES + 1)
    assert place.how(1, 1, 10, 10).prefix == "cached"  # used just now, so 2 went instead
    assert place.how(1, 2, 10, 10).prefix != "cached"


def test_options_are_checked() -> None:
    opts = options_from_dict({"protocol": "apr", "max_threads": 4, "sampling": {"max_new_tokens": 9}})
    assert opts.protocol == "apr" and opts.max_threads == 4 and opts.sampling.max_new_tokens == 9
    with pytest.raises(ValueError, match="unknown option"):
        options_from_dict({"max_thread": 4})


SLOW_LINK_S = 0.5  # each KV transfer waits this long before it is sent (see `coordinator`)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory):
    if not (MODEL / "config.json").exists():
        pytest.skip("no embedded model")
    model = tmp_path_factory.mktemp("model")
    for f in MODEL.iterdir():
        if f.name != "train_state.pt":
            shutil.copy(f, model / f.name)

    def slow_link() -> None:
        """In each Ray worker: KV transfers go as over a slow link, so a fork's later children
        reach the other replica before its prefix does. (Nested, so that Ray pickles it by value.)"""
        from cache_service.transfer import KVTransfer

        send = KVTransfer.send

        def slow_send(self: KVTransfer, *args: Any, **kwargs: Any) -> Any:
            time.sleep(SLOW_LINK_S)  # outside the send's own timing: the cost model sees the real bandwidth
            return send(self, *args, **kwargs)

        KVTransfer.send = slow_send  # type: ignore[method-assign]

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": slow_link})  # fmt: skip
    try:
        # capacity 1: a replica that is busy sends its forks' children to the other one.
        config = ClusterConfig(model_path=str(model), num_replicas=2, kv_cache_bytes=32 * 2**20, capacity=1)
        yield start(config)
    finally:
        ray.shutdown()


OPTIONS = {"protocol": "threadweaver", "join_policy": "first_success", "max_total_tokens": 300,
           "sampling": {"max_new_tokens": 200}}  # fmt: skip  # the root's fork: 4-8 outlines, ~25 tokens each
# The whole search, uncut: its children have enough work left to be worth sending to another
# replica, and one replica gives the same answer.
WHOLE = {"max_total_tokens": 8000}


def test_concurrent_requests_spread_over_replicas(coordinator) -> None:
    prompts = [f"{a} {a + 7} 3 2>{a + 12}\n" for a in (10, 20, 30, 40)]
    results = ray.get([coordinator.generate.remote(p, OPTIONS) for p in prompts])
    assert {r["replica"] for r in results} == {0, 1}
    assert all(r["finish_reason"] for r in results)
    assert any(len(r["threads"]) > 1 for r in results)  # the embedded model forks
    assert wait_until_idle(coordinator)  # pruned children on the other replica end too


def wait_until_idle(coordinator, timeout_s: float = 20.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if all(load["requests"] == 0 for load in ray.get(coordinator.loads.remote())):
            return True
        time.sleep(0.1)
    return False


def one_replica_answer(model: Path, prompt: str, options: dict) -> dict:
    """The same request on one in-process replica (no Ray): the reference answer."""
    from actors.replica import ReplicaWorker

    worker = ReplicaWorker(0, str(model), kv_cache_bytes=32 * 2**20, task="countdown")
    try:
        return worker.generate(prompt, options)
    finally:
        worker.shutdown()


def test_forked_children_spread_over_replicas_with_the_prefix_sent_exactly(coordinator) -> None:
    prompt = "92 51 8 3>49\n"
    options = {**OPTIONS, "join_policy": "all", **WHOLE}
    result = ray.get(coordinator.generate.remote(prompt, options))
    here = result["replica"]
    remote = [t for t in result["threads"] if t["replica"] is not None]
    assert remote and all(t["replica"] != here for t in remote)  # children ran on the other replica
    assert result["text"] == one_replica_answer(MODEL, prompt, options)["text"]  # greedy: the same answer
    counts = ray.get(coordinator.placement_counts.remote())[here]
    assert counts["transfer"] >= 1  # the prefix went by KV transfer (cheaper than recompute here)
    # The receiving replica holds the sender's prefix blocks bit for bit: over the slow link the
    # fork's other children arrived first and waited for them (else they would have computed
    # the prefix there, with other rounding, and the transfer's blocks been dropped as repeats).
    tokenizer = __import__("tokenizers").Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    context = tokenizer.encode(prompt + result["text"].split("</Outlines>")[0] + "</Outlines>").ids
    sent = ray.get(ray.get(coordinator.replica.remote(here)).cached_prefix.remote(context))
    got = ray.get(ray.get(coordinator.replica.remote(1 - here)).cached_prefix.remote(context))
    assert got[0] >= 16 and got[0] <= sent[0]
    n = got[0]
    assert torch.equal(got[1], sent[1][:, :n]) and torch.equal(got[2], sent[2][:, :n])


def test_batch_job_writes_every_line_once_retries_refusals_and_reruns_failures(coordinator, tmp_path: Path) -> None:
    requests = [
        {"id": "a", "nums": [12, 7, 3, 2], "target": 26, "max_total_tokens": 200},
        "not json",
        {"id": "c", "prompt": "5 6 7 8>30\n", **OPTIONS},
        {"id": "d", "nums": [40, 2, 9, 1], "target": 31, "max_thread": 3},  # a misspelt option
        {"id": "e", "nums": [50, 25, 4, 2], "target": 73, "max_total_tokens": 200},
        {"id": "f", "prompt": "5 6 7 8>30\n", "max_latency_s": 0.001},  # refused (503) every time
    ]
    inputs = tmp_path / "requests.jsonl"
    inputs.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests))
    output = tmp_path / "results.jsonl"
    summary = run(inputs, output, coordinator, concurrency=2, progress=False, retries=1)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6]
    assert (summary["answered"], summary["errors"], summary["refusals_retried"]) == (3, 3, 1)
    assert "unknown option" in next(r for r in rows if r["line"] == 4)["error"]
    assert "cannot be met" in next(r for r in rows if r["line"] == 6)["error"]

    # A rerun skips the answered lines and runs the failed ones again, one record a line.
    summary = run(inputs, output, coordinator, concurrency=2, progress=False, retries=0)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6]
    assert (summary["skipped_as_done"], summary["errors"], summary["refusals_retried"]) == (3, 3, 0)

    # A job killed mid-way: two lines written, a third cut off. Resume answers the rest once.
    kept = [json.dumps(r) for r in rows if r["line"] in (1, 3)]
    output.write_text("\n".join(kept) + "\n" + '{"line": 5, "te')
    summary = run(inputs, output, coordinator, concurrency=2, progress=False, retries=0)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6]
    assert summary["skipped_as_done"] == 2


def test_a_replica_killed_mid_request_is_survived(coordinator) -> None:
    """Kill a replica while requests run on it: each request is answered (run again on the
    other replica) or fails with a clear error, in bounded time; the cluster keeps serving;
    Ray restarts the replica and it takes forked children again."""
    prompts = [f"{a} {a - 9} 6 2>{a - 20}\n" for a in (60, 70, 80, 90)]
    refs = [coordinator.generate.remote(p, {**OPTIONS, "join_policy": "all"}) for p in prompts]
    time.sleep(1.0)
    victim = ray.get(coordinator.replica.remote(1))
    ray.kill(victim, no_restart=False)
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=180)
    assert not pending, "a request hung after its replica died"
    for ref in done:
        try:
            assert ray.get(ref)["finish_reason"] in ("stop", "length")
        except ray.exceptions.RayTaskError as error:
            assert "ReplicaFailed" in str(error) and "replica 1 failed mid-request" in str(error)
    assert ray.get(coordinator.generate.remote(prompts[0], OPTIONS), timeout=180)["finish_reason"]
    end = time.monotonic() + 180
    while True:  # Ray restarts it (the model loads again)
        try:
            ray.get(victim.load_dict.remote(), timeout=10)
            break
        except ray.exceptions.RayActorError:
            assert time.monotonic() < end, "the killed replica was not restarted"
            time.sleep(1)
    end = time.monotonic() + 60
    while time.monotonic() < end:  # the coordinator connects it again; then children spill to it
        result = ray.get(coordinator.generate.remote("92 51 8 3>49\n", {**OPTIONS, "join_policy": "all", **WHOLE}))
        if any(t["replica"] is not None for t in result["threads"]):
            break
        time.sleep(1)
    else:
        pytest.fail("the restarted replica never took forked children again")
    health = ray.get(coordinator.health.remote())
    assert health["live"] == 2 and health["restarts"] >= 1  # seen down, then back


def test_a_replica_gone_for_good_gets_no_requests_and_is_reported(coordinator) -> None:
    """After Ray stops restarting a replica, the coordinator stops placing requests there: each
    is answered by the live one, none waits on or fails at the dead one; health says 1 of 2.
    (Last in this module: it leaves the cluster one replica short.)"""
    ray.kill(ray.get(coordinator.replica.remote(1)), no_restart=True)
    end = time.monotonic() + 30
    while ray.get(coordinator.health.remote())["live"] != 1:
        assert time.monotonic() < end, "the dead replica is still counted live"
        time.sleep(0.2)
    prompts = [f"{a} {a - 9} 6 2>{a - 20}\n" for a in (61, 71, 81, 91)]
    results = ray.get([coordinator.generate.remote(p, OPTIONS) for p in prompts], timeout=180)
    assert [r["replica"] for r in results] == [0, 0, 0, 0]
    assert ray.get(coordinator.health.remote())["configured"] == 2
