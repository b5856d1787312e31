"""The join across samples (`actors.join`): its decisions as a plain class, verifiers and
tasks by import path, and the Join actor on a real local Ray cluster of two replicas
(samples spread, first_success cancelling the rest everywhere, a replica dying mid-sample)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from actors.join import Join, Samples
from actors.outcomes import ReplicaFailed
from actors.tasks import Task, load_verifier, task
from cluster.config import ClusterConfig, start
from countdown.traces import SERVE_OPTIONS

MODEL = Path(__file__).resolve().parents[1] / "countdown" / "model"
ROOT = Path(__file__).resolve().parents[1]
CHECK = Task(accepted=lambda prompt, text: text == "right", answer=str.strip)


def result(text: str, replica: int = 0, latency_s: float = 1.0) -> dict:
    usage = {"prompt_tokens": 5, "generated_tokens": 10, "total_tokens": 15, "critical_path_tokens": 10}
    return {"text": text, "replica": replica, "latency_s": latency_s, "usage": usage, "finish_reason": "stop"}


def test_a_vote_takes_the_most_common_answer_then_an_accepted_one_then_the_earliest() -> None:
    samples = Samples(["p"], 4, "vote", CHECK)
    for i, text in enumerate(["right", "a", "b", "a"]):
        assert not samples.decided()  # a vote waits for every sample, an accepted one too
        assert samples.finished(i, result(text, replica=i % 2)) == []  # and cancels nothing
    assert samples.decided()
    answer = samples.answer()
    (chosen,) = answer["results"]
    assert chosen["text"] == "a" and chosen["usage"]["generated_tokens"] == 40  # every sample's tokens
    assert [s["chosen"] for s in chosen["samples"]] == [False, True, False, False]
    assert answer["stats"] == {"samples": 4, "agreement": [0.5], "rejects": 3, "first_success_s": None,
                               "cancelled": 0, "replicas": [0, 1]}  # fmt: skip
    tie = Samples(["p"], 3, "vote", CHECK)
    for i, text in enumerate(["b", "right", "c"]):
        tie.finished(i, result(text))
    assert tie.answer()["results"][0]["text"] == "right"  # a tie: the accepted answer
    plain = Samples(["p"], 2, "vote", Task())
    plain.finished(1, result("y"))
    plain.finished(0, result("x"))
    assert plain.answer()["results"][0]["text"] == "x"  # no verifier: the earliest sample


def test_first_success_cancels_the_rest_of_its_prompt_and_falls_back_to_the_vote() -> None:
    samples = Samples(["p", "q"], 3, "first_success", CHECK)
    assert samples.finished(0, result("wrong")) == []
    assert samples.finished(1, result("right", latency_s=2.5)) == [2]  # prompt 0's last sample is not needed
    samples.cancelled(2)
    assert not samples.decided()  # prompt 1 has no answer yet
    for i in (3, 4, 5):
        samples.finished(i, result("w"))
    assert samples.decided()
    answer = samples.answer()
    assert [r["text"] for r in answer["results"]] == ["right", "w"]  # prompt 1: none accepted, the vote
    assert [s["status"] for s in answer["results"][0]["samples"]] == ["finished", "finished", "cancelled"]
    assert answer["stats"]["cancelled"] == 1 and answer["stats"]["first_success_s"] == 2.5
    assert answer["stats"]["rejects"] == 4


def test_a_sample_whose_result_came_after_its_cancel_counts_as_finished() -> None:
    samples = Samples(["p"], 2, "first_success", CHECK)
    assert samples.finished(0, result("right")) == [1]
    samples.cancelled(1)
    samples.finished(1, result("w"))  # it ended before the cancel reached its replica
    answer = samples.answer()
    assert [s["status"] for s in answer["results"][0]["samples"]] == ["finished", "finished"]
    assert answer["stats"]["cancelled"] == 0


def test_all_is_every_sample_and_fails_with_a_failed_one() -> None:
    samples = Samples(["p"], 2, "all", CHECK)
    samples.finished(1, result("b"))
    samples.finished(0, result("a"))
    assert [r["text"] for r in samples.answer()["results"]] == ["a", "b"]
    broken = Samples(["p"], 2, "all", CHECK)
    broken.finished(0, result("a"))
    broken.failed(1, ReplicaFailed("gone"))
    with pytest.raises(ReplicaFailed):
        broken.answer()


def test_first_success_needs_a_verifier() -> None:
    with pytest.raises(ValueError, match="needs a verifier"):
        Samples(["p"], 2, "first_success", Task())


def test_tasks_and_verifiers_load_by_import_path_with_clear_errors() -> None:
    assert load_verifier("tests.plugins:reject_all")("p", "t") is False
    assert task("countdown", "tests.plugins:accept_any").accepted("p", "anything")
    assert task("actors.tasks:NONE").accepted is None
    for path, message in [
        ("no_such_module:f", "cannot import 'no_such_module'"),
        ("tests.plugins:missing", "has no 'missing'"),
        ("tests.plugins", "not an import path"),
        ("tests.plugins:NOT_A_FUNCTION", "not a function"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_verifier(path)
    with pytest.raises(ValueError, match=r"verifier 'no_such_module:f': cannot import"):
        ClusterConfig(verifier="no_such_module:f")  # at start, before anything runs
    with pytest.raises(ValueError, match=r"not an actors\.tasks\.Task"):
        ClusterConfig(task="tests.plugins:accept_any")


def test_braid_serve_refuses_a_bad_verifier_before_it_starts() -> None:
    run = subprocess.run([sys.executable, "-m", "cluster.serve", "--no-auth", "--verifier", "nowhere:check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2 and "verifier 'nowhere:check': cannot import 'nowhere'" in run.stderr


def test_the_replica_imports_no_task() -> None:
    code = "import sys, actors.replica; print(sorted(m for m in sys.modules if m.startswith('countdown')))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[]", run.stderr


@pytest.fixture(scope="module")
def coordinator():
    if not (MODEL / "config.json").exists():
        pytest.skip("no embedded model")
    # Ray's workers import the tests' verifiers (tests.plugins) from the repository root.
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
    try:
        yield start(ClusterConfig(num_replicas=2, kv_cache_bytes=32 * 2**20))
    finally:
        ray.shutdown()


def options(seed: int) -> dict:
    sampling = {"temperature": 0.8, "seed": seed, "max_new_tokens": 4000}
    return {**SERVE_OPTIONS, "max_total_tokens": 4000, "sampling": sampling}


def join_run(coordinator, n: int, policy: str, verifier: str | None = None, seed: int = 5) -> dict:
    join = Join.remote(coordinator, "countdown", verifier, 600.0)
    try:
        return ray.get(join.run.remote(["95 91 78 36>72\n"], options(seed), n, policy, time.time()), timeout=300)
    finally:
        ray.kill(join)


def idle(coordinator, timeout_s: float = 20.0) -> list[dict]:
    """The replicas' loads once no request runs there (or at the timeout)."""
    end = time.monotonic() + timeout_s
    while True:
        loads = ray.get(coordinator.loads.remote())
        if all(load["requests"] == 0 for load in loads) or time.monotonic() > end:
            return loads
        time.sleep(0.1)


def test_n_samples_are_n_choices_spread_over_both_replicas(coordinator) -> None:
    answer = join_run(coordinator, 4, "all")
    assert len(answer["results"]) == 4 and answer["stats"]["replicas"] == [0, 1]
    assert len({r["text"] for r in answer["results"]}) > 1  # each its own seed


def test_first_success_cancels_the_other_samples_on_both_replicas_and_frees_their_kv(coordinator) -> None:
    answer = join_run(coordinator, 4, "first_success", "tests.plugins:accept_any", seed=11)
    (chosen,) = answer["results"]
    statuses = [s["status"] for s in chosen["samples"]]
    assert statuses.count("cancelled") == answer["stats"]["cancelled"] >= 1
    assert chosen["samples"][[s["chosen"] for s in chosen["samples"]].index(True)]["accepted"]
    for load in idle(coordinator):  # nothing left running anywhere, every KV block back
        assert (load["requests"], load["running"], load["waiting"]) == (0, 0, 0)
        assert load["free_blocks"] == load["total_blocks"]


def test_a_verifier_given_by_import_path_is_the_one_used(coordinator) -> None:
    answer = join_run(coordinator, 2, "first_success", "tests.plugins:reject_all")
    (chosen,) = answer["results"]
    assert answer["stats"]["rejects"] == 2 and answer["stats"]["cancelled"] == 0  # nothing accepted: the vote
    assert [s["accepted"] for s in chosen["samples"]] == [False, False]


def test_a_sample_whose_replica_dies_runs_again_on_the_other(coordinator) -> None:
    join = Join.remote(coordinator, "countdown", None, 600.0)
    call = join.run.remote(["95 91 78 36>72\n"], options(21), 2, "all", time.time())
    end = time.monotonic() + 60
    while not all(load["requests"] for load in ray.get(coordinator.loads.remote())):  # one sample a replica
        assert time.monotonic() < end, "the samples did not start on both replicas"
        time.sleep(0.05)
    before = ray.get(coordinator.health.remote())["retries"]
    ray.kill(ray.get(coordinator.replica.remote(1)), no_restart=False)
    answer = ray.get(call, timeout=300)
    ray.kill(join)
    assert len(answer["results"]) == 2 and all(r["text"] for r in answer["results"])
    assert ray.get(coordinator.health.remote())["retries"] > before
