"""Replicas and the coordinator on a real local Ray cluster; the batch job with resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray

from actors.coordinator import Placement
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


def test_options_are_checked() -> None:
    opts = options_from_dict({"protocol": "apr", "max_threads": 4, "sampling": {"max_new_tokens": 9}})
    assert opts.protocol == "apr" and opts.max_threads == 4 and opts.sampling.max_new_tokens == 9
    with pytest.raises(ValueError, match="unknown option"):
        options_from_dict({"max_thread": 4})


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory):
    if not (MODEL / "config.json").exists():
        pytest.skip("no embedded model")
    model = tmp_path_factory.mktemp("model")
    for f in MODEL.iterdir():
        if f.name != "train_state.pt":
            shutil.copy(f, model / f.name)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield start(ClusterConfig(model_path=str(model), num_replicas=2, kv_cache_bytes=32 * 2**20))
    finally:
        ray.shutdown()


OPTIONS = {"protocol": "threadweaver", "join_policy": "first_success", "max_total_tokens": 200,
           "sampling": {"max_new_tokens": 60}}  # fmt: skip


def test_concurrent_requests_spread_over_replicas(coordinator) -> None:
    prompts = [f"{a} {a + 7} 3 2>{a + 12}\n" for a in (10, 20, 30, 40)]
    results = ray.get([coordinator.generate.remote(p, OPTIONS) for p in prompts])
    assert {r["replica"] for r in results} == {0, 1}
    assert all(r["finish_reason"] for r in results)
    assert any(len(r["threads"]) > 1 for r in results)  # the embedded model forks
    loads = ray.get(coordinator.loads.remote())
    assert [load["requests"] for load in loads] == [0, 0]


def test_batch_job_writes_every_line_once_and_resumes(coordinator, tmp_path: Path) -> None:
    requests = [
        {"id": "a", "nums": [12, 7, 3, 2], "target": 26, "max_total_tokens": 200},
        "not json",
        {"id": "c", "prompt": "5 6 7 8>30\n", **OPTIONS},
        {"id": "d", "nums": [40, 2, 9, 1], "target": 31, "max_thread": 3},  # a misspelt option
        {"id": "e", "nums": [50, 25, 4, 2], "target": 73, "max_total_tokens": 200},
    ]
    inputs = tmp_path / "requests.jsonl"
    inputs.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in requests))
    output = tmp_path / "results.jsonl"
    summary = run(inputs, output, coordinator, concurrency=2, progress=False)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5]
    assert summary["answered"] == 3 and summary["errors"] == 2
    assert "unknown option" in next(r for r in rows if r["line"] == 4)["error"]

    # A job killed mid-way: two lines written, a third cut off. Resume answers the rest once.
    kept = [json.dumps(r) for r in rows if r["line"] in (1, 3)]
    output.write_text("\n".join(kept) + "\n" + '{"line": 5, "te')
    summary = run(inputs, output, coordinator, concurrency=2, progress=False)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5]
    assert summary["skipped_as_done"] == 2
