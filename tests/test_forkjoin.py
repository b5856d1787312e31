"""Fork-join end to end on one replica, each protocol, with scripted (teacher-forced) threads.

After every request the cache passes `check_integrity()` with no block in use.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.engine import Engine
from engine.forkjoin import ForkJoinEngine
from engine.sampling import SamplingParams
from engine.threads import ForkJoinOptions, ForkJoinResult
from tests.checkpoints import load_reference
from tests.scripted import Scripts, make_protocol_checkpoint, scripted_engine
from tests.test_model_runner import ATOL, reference_logits

MV_ROOT = "<Parallel><Goal><Outline>1: left</Outline><Outline>2: right</Outline></Goal>"
MV_SCRIPTS = {
    "Q:": MV_ROOT + " so 42</Conclusion></Parallel> done",
    "<Path>\n1:": " went left</Path>",
    "<Path>\n2:": " went right, further on</Path>",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_protocol_checkpoint(tmp_path_factory.mktemp("protocols"))


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tags spelled out byte by byte: a tag arrives split over many tokens."""
    return make_protocol_checkpoint(tmp_path_factory.mktemp("plain"), tags_as_tokens=False)


def run(
    ckpt: Path, scripts: dict[str, str], verifier=None, prompt: str = "Q:", succeeded=None, **options: object
) -> tuple[ForkJoinResult, ForkJoinEngine, Scripts]:
    engine, forced = scripted_engine(ckpt, scripts)
    fj = ForkJoinEngine(engine, verifier, succeeded=succeeded)
    options.setdefault("sampling", SamplingParams(max_new_tokens=200))
    (result,) = fj.run([prompt], ForkJoinOptions(**options))
    engine.cache.check_integrity()
    assert engine.cache.stats().used_blocks == 0, "a request left KV blocks in use"
    assert not fj.requests and not engine.has_work()
    return result, fj, forced


def by_status(result: ForkJoinResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in result.threads:
        counts[node.status] = counts.get(node.status, 0) + 1
    return counts


def logits_after_join(forced: Scripts, result: ForkJoinResult, root_tokens_before: int) -> torch.Tensor:
    return forced.seen[(result.threads[0].thread_id, root_tokens_before)]


@pytest.mark.parametrize("tags_as_tokens", [True, False])
def test_multiverse_forks_merges_kv_and_concludes(ckpt: Path, plain_ckpt: Path, tags_as_tokens: bool) -> None:
    result, _fj, _forced = run(ckpt if tags_as_tokens else plain_ckpt, MV_SCRIPTS, protocol="multiverse")
    want = MV_ROOT + "<Path>\n1: went left</Path><Path>\n2: went right, further on</Path>"
    assert result.text == want + "<Conclusion> so 42</Conclusion></Parallel> done"
    assert result.finish_reason == "stop"
    root, a, b = result.threads
    assert (a.parent_id, b.parent_id) == (root.thread_id, root.thread_id)
    assert [a.status, b.status] == ["joined", "joined"] and root.children == [a.thread_id, b.thread_id]
    assert result.cache["shared_blocks"] > 0  # the children really shared the prefix
    # Critical path: the root's own tokens plus the longer child.
    assert result.usage.critical_path_tokens == root.generated_tokens + max(a.generated_tokens, b.generated_tokens)
    assert result.usage.generated_tokens == root.generated_tokens + a.generated_tokens + b.generated_tokens


def test_multiverse_conclusion_attends_as_the_format_defines(ckpt: Path) -> None:
    """The root's first logits after the merge equal transformers' with the Multiverse
    mask: each path sees the prefix and itself; the conclusion sees everything, at
    positions after the longest path."""
    result, fj, forced = run(ckpt, MV_SCRIPTS, protocol="multiverse")
    tok = fj.engine.tokenizer
    root_ids = tok.encode("Q:").ids
    prefix = root_ids + tok.encode(MV_ROOT).ids
    paths = [tok.encode("<Path>\n1: went left</Path>").ids, tok.encode("<Path>\n2: went right, further on</Path>").ids]
    conclusion = tok.encode("<Conclusion>").ids
    tokens = prefix + paths[0] + paths[1] + conclusion
    p = len(prefix)
    positions = list(range(p + len(paths[0]))) + list(range(p, p + len(paths[1])))
    longest = p + max(map(len, paths))
    positions += list(range(longest, longest + len(conclusion)))
    segment = [0] * p + [1] * len(paths[0]) + [2] * len(paths[1]) + [3] * len(conclusion)
    mask = torch.tril(torch.ones(len(tokens), len(tokens), dtype=torch.bool))
    for i in range(len(tokens)):
        for j in range(i):
            if {segment[i], segment[j]} == {1, 2}:
                mask[i, j] = False
    want = reference_logits(load_reference(ckpt), tokens, positions, mask)[-1]
    root_generated_before_join = len(tok.encode(MV_ROOT).ids)
    got = logits_after_join(forced, result, root_generated_before_join)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


TW_ROOT = "<Parallel><Outlines><Outline>1: a</Outline><Outline>2: b</Outline></Outlines>"


def test_threadweaver_appends_threads_and_parent_kv_equals_fresh_prefill(ckpt: Path) -> None:
    scripts = {"Q:": TW_ROOT + "answer", "<Thread>\n1:1: a\n": "one</Thread>", "<Thread>\n2:2: b\n": "two two</Thread>"}
    result, fj, forced = run(ckpt, scripts, protocol="threadweaver")
    # Each thread's header repeats its outline.
    joined = "\n<Thread>\n1:1: a\none</Thread>\n<Thread>\n2:2: b\ntwo two</Thread>\n</Parallel>\n"
    assert result.text == TW_ROOT + joined + "answer"
    tok = fj.engine.tokenizer
    context = tok.encode("Q:" + TW_ROOT + joined).ids
    got = logits_after_join(forced, result, len(tok.encode(TW_ROOT).ids))
    torch.testing.assert_close(got, reference_logits(load_reference(ckpt), context)[-1], atol=ATOL, rtol=0)


APR_ROOT = (
    "<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to A\n"
    "<Start Sub Search 1 at level 1> Moving to B\n<End Calling Sub Searches>"
)
APR_SCRIPTS = {
    "Q:": APR_ROOT + "final",
    "Moving to A\n": "try 1\n<No Solution>\n",
    "Moving to B\n": "try 2\n<Goal Reached> 6*4=24\n",
}


def test_apr_children_start_fresh_and_only_results_are_joined(ckpt: Path) -> None:
    result, fj, forced = run(ckpt, APR_SCRIPTS, protocol="apr")
    joined = (
        "<Sub Searches>\n<No Solution in Sub Search 0 at level 1>\n"
        "<Goal Reached in Sub Search 1 at level 1> 6*4=24\n<End Sub Searches>\n"
    )
    assert result.text == APR_ROOT + joined + "final"
    assert [n.spawn for n in result.threads[1:]] == ["Moving to A", "Moving to B"]
    tok = fj.engine.tokenizer
    context = tok.encode("Q:" + APR_ROOT + joined).ids
    got = logits_after_join(forced, result, len(tok.encode(APR_ROOT).ids))
    torch.testing.assert_close(got, reference_logits(load_reference(ckpt), context)[-1], atol=ATOL, rtol=0)


def test_nested_and_sequential_forks(ckpt: Path) -> None:
    scripts = {
        "Q:": "<Goal><Outline>x</Outline><Outline>y</Outline></Goal>A<Goal><Outline>z</Outline></Goal>B",
        "</Goal><Path>\n1:": " px</Path>",  # first fork, child 1 ... and second fork's only child
        "</Goal><Path>\n2:": " <Goal><Outline>deep</Outline></Goal>!</Path>",  # forks again inside
        "deep</Outline></Goal><Path>\n1:": " leaf</Path>",
    }
    result, _fj, _forced = run(ckpt, scripts, protocol="multiverse", max_depth=2)
    assert result.text == (
        "<Goal><Outline>x</Outline><Outline>y</Outline></Goal>"
        "<Path>\n1: px</Path><Path>\n2: <Goal><Outline>deep</Outline></Goal><Path>\n1: leaf</Path><Conclusion>!</Path>"
        "<Conclusion>A<Goal><Outline>z</Outline></Goal><Path>\n1: px</Path><Conclusion>B"
    )
    depths = sorted(n.depth for n in result.threads)
    assert depths == [0, 1, 1, 1, 2]
    forks = {n.fork for n in result.threads if n.parent_id == result.threads[0].thread_id}
    assert forks == {0, 1}  # the root forked twice, one after the other


def test_fork_past_max_depth_is_refused_and_the_thread_goes_on(ckpt: Path) -> None:
    scripts = {"Q:": "<Goal><Outline>x</Outline></Goal>alone"}
    result, _, _ = run(ckpt, scripts, protocol="multiverse", max_depth=0)
    assert result.text == "<Goal><Outline>x</Outline></Goal>alone"
    assert len(result.threads) == 1 and "fork refused: max_depth 0" in result.threads[0].notes


def test_first_success_cancels_the_rest_and_frees_their_kv(ckpt: Path) -> None:
    scripts = {
        "Q:": "<Goal><Outline>a</Outline><Outline>b</Outline><Outline>c</Outline></Goal>end",
        "<Path>\n1:": " no</Path>",
        "<Path>\n2:": " yes</Path>",
        "<Path>\n3:": " " + "long " * 40 + "yes</Path>",
    }
    result, _fj, _ = run(
        ckpt, scripts, verifier=lambda prompt, text: "yes" in text, protocol="multiverse", join_policy="first_success"
    )
    nodes = result.threads
    assert [n.status for n in nodes[1:]] == ["rejected", "joined", "pruned"]
    assert nodes[3].generated_tokens < 40  # cut off long before its end
    assert result.text == "<Goal><Outline>a</Outline><Outline>b</Outline><Outline>c</Outline></Goal>" + (
        "<Path>\n2: yes</Path><Conclusion>end"
    )


def test_first_success_with_no_success_joins_nothing_of_the_children(ckpt: Path) -> None:
    """Every child ends without succeeding: the parent reads an empty join (no child text to
    prefill) and goes on; the children are released, none joined."""
    scripts = {
        "Q:": "<Parallel><Outlines><Outline>a</Outline><Outline>b</Outline></Outlines>none",
        "<Thread>\n1:a\n": "tried a, no</Thread>",
        "<Thread>\n2:b\n": "tried b at length, no</Thread>",
    }
    result, _, _ = run(
        ckpt, scripts, succeeded=lambda text: "yes" in text, protocol="threadweaver", join_policy="first_success"
    )
    assert [n.status for n in result.threads[1:]] == ["pruned", "pruned"]  # ended, not joined
    assert result.text == "<Parallel><Outlines><Outline>a</Outline><Outline>b</Outline></Outlines>\n</Parallel>\nnone"


def test_pruning_a_child_also_prunes_its_own_open_fork(ckpt: Path) -> None:
    scripts = {
        "Q:": "<Goal><Outline>a</Outline><Outline>b</Outline></Goal>end",
        "</Goal><Path>\n1:": " " + "q" * 40 + "</Path>",  # succeeds after its sibling has forked
        "</Goal><Path>\n2:": " <Goal><Outline>deep</Outline></Goal>never reached</Path>",
        "deep</Outline></Goal><Path>\n1:": " " + "slow " * 60 + "</Path>",
    }
    result, _, _ = run(ckpt, scripts, protocol="multiverse", join_policy="first_success", max_depth=2)
    assert [n.status for n in result.threads if n.depth == 1] == ["joined", "pruned"]
    assert [n.status for n in result.threads if n.depth == 2] == ["pruned"]  # went with its parent
    assert result.text.endswith("<Path>\n1: " + "q" * 40 + "</Path><Conclusion>end")


def test_vote_joins_the_majority(ckpt: Path) -> None:
    scripts = {
        "Q:": "<Parallel><Outlines><Outline>a</Outline><Outline>b</Outline><Outline>c</Outline></Outlines>end",
        "<Thread>\n1:a\n": "so A</Thread>",
        "<Thread>\n2:b\n": "so B</Thread>",
        "<Thread>\n3:c\n": "so A</Thread>",
    }
    result, _, _ = run(ckpt, scripts, protocol="threadweaver", join_policy="vote")
    assert [n.status for n in result.threads[1:]] == ["joined", "pruned", "joined"]
    assert "<Thread>\n1:a\nso A</Thread>\n<Thread>\n3:c\nso A</Thread>\n</Parallel>" in result.text


def test_max_threads_makes_children_wait_for_a_slot(ckpt: Path) -> None:
    result, _, _ = run(ckpt, MV_SCRIPTS, protocol="multiverse", max_threads=1)
    root, a, b = result.threads
    assert b.start_s >= a.end_s  # one at a time
    assert any("wait for a thread slot" in note for note in root.notes)
    assert [a.status, b.status] == ["joined", "joined"]


def test_fanout_cap_drops_spawns_with_a_marker(ckpt: Path) -> None:
    outlines = "".join(f"<Outline>{i}</Outline>" for i in range(5))
    scripts = {"Q:": f"<Goal>{outlines}</Goal>end", "<Path>\n1:": " a</Path>", "<Path>\n2:": " b</Path>"}
    result, _, _ = run(ckpt, scripts, protocol="multiverse", max_fanout=2)
    assert len(result.threads) == 3
    assert "fork capped: 3 of 5 spawns dropped" in result.threads[0].notes


def test_child_token_limit_truncates_and_closes_the_block(ckpt: Path) -> None:
    scripts = {"Q:": "<Goal><Outline>a</Outline></Goal>end", "<Path>\n1:": " " + "z" * 50}
    result, _, _ = run(ckpt, scripts, protocol="multiverse", child_max_tokens=5)
    child = result.threads[1]
    assert child.status == "joined" and "truncated" in child.notes and child.generated_tokens == 5
    assert result.text.endswith("<Path>\n1: zzzz</Path><Conclusion>end")


def test_total_token_budget_ends_the_request_cleanly(ckpt: Path) -> None:
    long = " " + "w" * 80
    scripts = {"Q:": "<Goal><Outline>a</Outline><Outline>b</Outline></Goal>end", "<Path>\n1:": long, "<Path>\n2:": long}
    result, _, _ = run(ckpt, scripts, protocol="multiverse", max_total_tokens=40)
    assert result.finish_reason == "length"
    assert result.usage.generated_tokens == 40
    assert by_status(result).get("truncated", 0) >= 2


@pytest.mark.parametrize(
    ("root", "note"),
    [
        ("</Goal> stray close, <Outline>x</Outline> and <Unknown> tags", None),
        ("<Goal><Outline>never closed", None),
        ("<Goal></Goal>after", "empty fork: no children"),
        ("<Goal><Outline>a</Goal>after", None),  # an outline left open: the fork has no children
        ("<" + "x" * 100 + " not a tag", None),
    ],
)
def test_malformed_output_never_hangs_or_leaks(ckpt: Path, root: str, note: str | None) -> None:
    result, _, _ = run(ckpt, {"Q:": root}, protocol="multiverse")
    assert result.text == root and len(result.threads) == 1
    if note:
        assert note in result.threads[0].notes


def test_child_that_never_closes_its_block_is_truncated(ckpt: Path) -> None:
    scripts = {"Q:": "<Goal><Outline>a</Outline></Goal>end", "<Path>\n1:": " rambles"}  # EOS, no </Path>
    result, _, _ = run(ckpt, scripts, protocol="multiverse")
    assert result.threads[1].status == "joined" and "truncated" in result.threads[1].notes
    assert "<Path>\n1: rambles</Path><Conclusion>end" in result.text


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="join_policy"):
        ForkJoinOptions(join_policy="best")
    with pytest.raises(ValueError, match="max_threads"):
        ForkJoinOptions(max_threads=0)
    from engine.protocols import get_protocol

    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("tree-of-thought")


def test_children_run_concurrently(ckpt: Path) -> None:
    result, _, _ = run(ckpt, MV_SCRIPTS, protocol="multiverse")
    _, a, b = result.threads
    assert a.start_s < b.end_s and b.start_s < a.end_s


@pytest.mark.parametrize("num_blocks", [10, 14, 40])
def test_a_short_pool_delays_or_fails_cleanly(ckpt: Path, num_blocks: int) -> None:
    """Children and joins wait for blocks; if nothing can ever run the request ends
    with out_of_blocks. Either way nothing leaks."""
    outlines = "".join(f"<Outline>{i}</Outline>" for i in range(4))
    scripts = {
        "Q:": f"<Goal>{outlines}</Goal>end",
        **{f"<Path>\n{i}:": " " + "k" * 30 + "</Path>" for i in range(1, 5)},
    }
    bytes_per_block = scripted_engine(ckpt, scripts)[0].cache.config.bytes_per_block
    engine, _ = scripted_engine(ckpt, scripts, kv_cache_bytes=num_blocks * bytes_per_block)
    fj = ForkJoinEngine(engine)
    (result,) = fj.run(["Q:"], ForkJoinOptions(protocol="multiverse", sampling=SamplingParams(max_new_tokens=200)))
    assert result.finish_reason in ("stop", "out_of_blocks")
    if num_blocks == 40:
        assert result.finish_reason == "stop" and result.text.endswith("<Conclusion>end")
    engine.cache.check_integrity()
    assert engine.cache.stats().used_blocks == 0


class OtherReplica:
    """A second engine in this process standing in for another replica: it steps once each
    time a remote child's result is asked for."""

    def __init__(self, ckpt: Path, scripts: dict[str, str], fail: bool = False) -> None:
        engine, _ = scripted_engine(ckpt, scripts)
        self.fj = ForkJoinEngine(engine)
        self.fail = fail
        self.finished: dict[int, dict] = {}
        self.cancelled: list[int] = []

    def offload(self, parent, context: list[int], options: ForkJoinOptions, depth: int):
        if not self.fj.engine.tokenizer.decode(context).endswith("<Thread>\n2:2: b\n"):
            return None  # child 2 goes elsewhere, the rest stay
        return RemoteHere(self, self.fj.submit(context, options, depth=depth, request_prompt="Q:"))


class RemoteHere:
    replica = 1

    def __init__(self, other: OtherReplica, request_id: int) -> None:
        self.other, self.request_id = other, request_id

    def result(self) -> dict | None:
        if self.other.fail:
            raise RuntimeError("the replica died")
        self.other.finished.update((r.request_id, r.to_dict()) for r in self.other.fj.step())
        return self.other.finished.get(self.request_id)

    def cancel(self) -> None:
        self.other.cancelled.append(self.request_id)


TW_NESTED = {
    "Q:": TW_ROOT + "answer",
    "<Thread>\n1:1: a\n": "one</Thread>",
    "<Thread>\n2:2: b\n": "<Parallel><Outlines><Outline>x</Outline></Outlines>two</Thread>",
    "<Thread>\n1:x\n": "deep</Thread>",
}


@pytest.mark.parametrize("fail", [False, True])
def test_a_child_run_on_another_replica_joins_like_a_local_one(ckpt: Path, fail: bool) -> None:
    local, _, _ = run(ckpt, TW_NESTED, protocol="threadweaver")
    engine, _ = scripted_engine(ckpt, TW_NESTED)
    other = OtherReplica(ckpt, TW_NESTED, fail=fail)
    fj = ForkJoinEngine(engine, offload=other.offload)
    (result,) = fj.run(["Q:"], ForkJoinOptions(protocol="threadweaver", sampling=SamplingParams(max_new_tokens=200)))
    assert result.text == local.text  # the same answer, wherever the child ran
    remote = [n for n in result.threads if n.replica == 1]
    assert len(remote) == 1 and remote[0].thread_id < 0
    if fail:  # started again here, from its context
        assert remote[0].status == "failed" and "started again here" in remote[0].notes[0]
        assert len(result.threads) == len(local.threads) + 1
    else:  # the remote child's own fork ran over there: its subtree is summarized
        assert remote[0].status == "joined" and remote[0].notes == ["ran on replica 1: 2 threads"]
        assert result.usage.generated_tokens == local.usage.generated_tokens
        assert result.usage.critical_path_tokens == local.usage.critical_path_tokens
        assert other.fj.engine.cache.stats().used_blocks == 0
    assert engine.cache.stats().used_blocks == 0


def test_a_child_shaped_by_its_deadline_elsewhere_shapes_the_request(ckpt: Path) -> None:
    """The other replica says its request (the remote child) was shaped by its deadline (a fork
    of its own refused there, say): the parent request here was too."""

    class ShapedRemote(RemoteHere):
        def result(self) -> dict | None:
            result = super().result()
            return None if result is None else {**result, "deadline_shaped": True}

    class ShapedThere(OtherReplica):
        def offload(self, *args):
            remote = super().offload(*args)
            return None if remote is None else ShapedRemote(self, remote.request_id)

    engine, _ = scripted_engine(ckpt, TW_NESTED)
    fj = ForkJoinEngine(engine, offload=ShapedThere(ckpt, TW_NESTED).offload)
    (result,) = fj.run(["Q:"], ForkJoinOptions(protocol="threadweaver", sampling=SamplingParams(max_new_tokens=200)))
    assert any(n.replica == 1 for n in result.threads) and result.deadline_shaped


def test_multiverse_children_stay_with_their_parent(ckpt: Path) -> None:
    """A Multiverse join merges the children's KV into the parent's: its children run where the
    parent's KV is, never on another replica (the offload hook is not asked)."""
    local, _, _ = run(ckpt, MV_SCRIPTS, protocol="multiverse")
    engine, _ = scripted_engine(ckpt, MV_SCRIPTS)
    asked: list[int] = []
    fj = ForkJoinEngine(engine, offload=lambda parent, context, options, depth: asked.append(depth))
    (result,) = fj.run(["Q:"], ForkJoinOptions(protocol="multiverse", sampling=SamplingParams(max_new_tokens=200)))
    assert asked == [] and result.text == local.text
    assert all(node.replica is None for node in result.threads)
    assert engine.cache.stats().used_blocks == 0


class StepClock:
    """A clock that advances 10 ms per engine step: deadlines in steps, not in machine speed."""

    def __init__(self, engine) -> None:
        self.engine, self.steps = engine, 0
        step = engine.step

        def counted():
            self.steps += 1
            return step()

        engine.step = counted

    def __call__(self) -> float:
        return 0.01 * self.steps


def run_with_budget(
    ckpt: Path, scripts: dict[str, str], budget_s: float, succeeded=None, **options: object
) -> tuple[ForkJoinResult, Engine]:
    """A ThreadWeaver request with a latency budget, timed by a clock of 10 ms per engine step."""
    engine, _ = scripted_engine(ckpt, scripts)
    fj = ForkJoinEngine(engine, succeeded=succeeded, clock=StepClock(engine))
    options = ForkJoinOptions(
        protocol="threadweaver", max_latency_s=budget_s, sampling=SamplingParams(max_new_tokens=400), **options
    )
    (result,) = fj.run(["Q:"], options)
    return result, engine


def test_a_latency_budget_gives_children_token_budgets_then_ends_the_request(ckpt: Path) -> None:
    scripts = {
        "Q:": TW_ROOT + "answer " + "more " * 100,
        "<Thread>\n1:1: a\n": "one</Thread>",
        "<Thread>\n2:2: b\n": "slow " * 100 + "</Thread>",
    }
    result, engine = run_with_budget(ckpt, scripts, 1.0)
    root, fast, slow = result.threads
    # Joins are due 35 steps (ANSWER_STEPS + END_STEPS) before the budget: at 0.65 s, so a child
    # forked at 0.15 s may generate 50 tokens; the slow one is cut there and joined.
    assert fast.notes == slow.notes[:1] == ["token budget 50: deadline"]
    assert fast.status == "joined" and slow.status == "joined" and slow.notes[1] == "truncated"
    assert slow.generated_tokens == 50 and slow.end_s <= 0.65 + 0.01
    assert result.text.startswith(TW_ROOT + "\n<Thread>\n1:1: a\none</Thread>\n<Thread>\n2:2: b\nslow slow")
    assert "slow </Thread>\n</Parallel>\nanswer more" in result.text
    assert result.finish_reason == "deadline" and root.end_s <= 1.0 - 0.03 + 0.01  # ended 3 steps before the budget
    assert engine.cache.stats().used_blocks == 0


def test_a_budget_under_first_success_with_no_success_joins_none_of_the_children(ckpt: Path) -> None:
    """Under a budget no child succeeds (one ends, one is cut at its token budget): the root
    reads an empty join and writes its answer, with no cut child's text to prefill first."""
    scripts = {
        "Q:": TW_ROOT + "answer " + "more " * 100,
        "<Thread>\n1:1: a\n": "one</Thread>",
        "<Thread>\n2:2: b\n": "slow " * 100 + "</Thread>",
    }
    result, engine = run_with_budget(ckpt, scripts, 1.0, lambda text: "found" in text, join_policy="first_success")
    _, fast, slow = result.threads
    assert [fast.status, slow.status] == ["pruned", "pruned"] and slow.generated_tokens == 50
    assert result.text.startswith(TW_ROOT + "\n</Parallel>\nanswer more")
    assert result.deadline_shaped  # a child cut at its deadline: admission learns no cost from it
    assert engine.cache.stats().used_blocks == 0


def test_no_fork_once_the_join_time_has_passed(ckpt: Path) -> None:
    result, _ = run_with_budget(ckpt, {"Q:": TW_ROOT + "answer"}, 0.4)  # joins due at 0.05 s: fork at 0.15 s
    assert [n.notes for n in result.threads] == [["fork refused: deadline"]]
    assert result.text == TW_ROOT + "answer" and result.finish_reason == "stop"
    # It ended on its own, soon, having searched nothing: admission must not learn its cost from it.
    assert result.deadline_shaped


def test_a_request_its_budget_did_not_touch_is_not_deadline_shaped(ckpt: Path) -> None:
    """Children given a deadline's token budget that end before it, or a child cut at its own
    `child_max_tokens` with no budget at all: the request's cost is what it used."""
    scripts = {"Q:": TW_ROOT + "answer", "<Thread>\n1:1: a\n": "one</Thread>", "<Thread>\n2:2: b\n": "two</Thread>"}
    result, _ = run_with_budget(ckpt, scripts, 1.0)
    assert result.threads[1].notes == ["token budget 50: deadline"]
    assert result.finish_reason == "stop" and not result.deadline_shaped
    scripts["<Thread>\n2:2: b\n"] = "slow " * 100 + "</Thread>"
    result, _, _ = run(ckpt, scripts, protocol="threadweaver", child_max_tokens=20)
    assert result.threads[2].generated_tokens == 20 and not result.deadline_shaped


def test_a_budget_counts_from_the_requests_arrival(ckpt: Path) -> None:
    """A request that waited 0.6 s before it could be submitted (a replica's step was running)
    has 0.4 s of its 1.0 s budget left: its joins are due at 0.05 s, so its fork is refused."""
    engine, _ = scripted_engine(ckpt, {"Q:": TW_ROOT + "answer"})
    fj = ForkJoinEngine(engine, clock=StepClock(engine))
    options = ForkJoinOptions(protocol="threadweaver", max_latency_s=1.0, sampling=SamplingParams(max_new_tokens=400))
    fj.submit("Q:", options, arrived=-0.6)
    results = []
    while not results:
        results = fj.step()
    assert [n.notes for n in results[0].threads] == [["fork refused: deadline"]]


def test_nested_forks_join_first_so_that_each_parent_can_conclude(ckpt: Path) -> None:
    scripts = {
        "Q:": TW_ROOT + "answer",
        "<Thread>\n1:1: a\n": "one</Thread>",
        "<Thread>\n2:2: b\n": "<Parallel><Outlines><Outline>x</Outline></Outlines>two</Thread>",
        "<Thread>\n1:x\n": "slow " * 100 + "</Thread>",
    }
    result, engine = run_with_budget(ckpt, scripts, 1.0)
    root, x = result.threads[0], result.threads[3]
    # b's fork joins 32 steps before the root's (0.33 s vs 0.65 s): x is cut there, b concludes,
    # the root's fork joins in full, and the root answers on its own within the budget.
    assert [n.status for n in result.threads] == ["done", "joined", "joined", "joined"]
    assert x.notes[-1] == "truncated" and x.end_s <= 0.33 + 0.01
    assert result.text.endswith("\n1:x\nslow slow sl</Thread>\n</Parallel>\ntwo</Thread>\n</Parallel>\nanswer")
    assert result.finish_reason == "stop" and root.end_s < 1.0 and not root.notes
    assert result.deadline_shaped  # x's search was cut: what it used is a floor of its cost
    assert engine.cache.stats().used_blocks == 0


def test_a_join_prunes_a_child_together_with_its_own_open_fork(ckpt: Path) -> None:
    scripts = {
        "Q:": TW_ROOT + "answer",
        "<Thread>\n1:1: a\n": "one " * 6 + "</Thread>",
        "<Thread>\n2:2: b\n": "<Parallel><Outlines><Outline>x</Outline></Outlines>two</Thread>",
        "<Thread>\n1:x\n": "slow " * 100 + "</Thread>",
    }
    engine, _ = scripted_engine(ckpt, scripts)
    fj = ForkJoinEngine(engine)
    options = ForkJoinOptions(protocol="threadweaver", join_policy="first_success")
    (result,) = fj.run(["Q:"], options)  # a succeeds first: b goes, and its open fork with it
    assert [n.status for n in result.threads] == ["done", "joined", "pruned", "pruned"]
    assert result.text.endswith("one </Thread>\n</Parallel>\nanswer")
    assert engine.cache.stats().used_blocks == 0


def test_with_one_thread_a_step_the_earliest_deadline_runs_first(ckpt: Path) -> None:
    """`max_step_threads=1`: a request without a budget arrives, then one with a far deadline,
    then one with a near deadline that forks (its children carry its deadline). They end near,
    far, none: budgeted requests before unbudgeted ones, each in deadline order, whatever the
    order they came in; and the near one ends after exactly the steps it takes alone: no
    other request's thread took a step from it."""
    scripts = {
        "A:": "a " * 10, "B:": "b " * 10, "C:": TW_ROOT + "answer",
        "<Thread>\n1:1: a\n": "one</Thread>", "<Thread>\n2:2: b\n": "two two</Thread>",
    }  # fmt: skip

    def options(budget_s: float | None) -> ForkJoinOptions:
        sampling = SamplingParams(max_new_tokens=100)
        return ForkJoinOptions(protocol="threadweaver", max_latency_s=budget_s, sampling=sampling)

    def ends(prompts: list[tuple[str, float | None]]) -> list[tuple[str, int]]:
        """(prompt, the engine step it ended at) of each request, in the order they ended."""
        engine, _ = scripted_engine(ckpt, scripts, max_step_threads=1)
        clock = StepClock(engine)
        fj = ForkJoinEngine(engine, clock=clock)
        ids = {fj.submit(text, options(budget)): text for text, budget in prompts}
        ended = []
        while fj.has_work():
            ended += [(ids[r.request_id], clock.steps) for r in fj.step() if r.finish_reason == "stop"]
        return ended

    ((_, alone),) = ends([("C:", 30.0)])
    together = ends([("A:", None), ("B:", 60.0), ("C:", 30.0)])
    assert [text for text, _ in together] == ["C:", "B:", "A:"]
    assert together[0][1] == alone
