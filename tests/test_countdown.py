"""Countdown: problems, solver, traces, checker, verifier, tokenizer, training, and the
shipped checkpoint solving problems through Braid's engine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from countdown import problems, traces
from countdown.problems import Problem, apply, solve
from countdown.tokenizer import build, save
from countdown.verify import check_answer, claims_found, final_answer, verify_claim

SHIPPED = Path(__file__).resolve().parents[1] / "countdown" / "model"


def view(segments: list[traces.Segment], index: int) -> list[str]:
    """The texts a segment's thread sees, oldest first: its chain of parent segments and itself."""
    chain, at = [], index
    while at is not None:
        chain.insert(0, segments[at].text)
        at = segments[at].parent
    return chain


def test_generated_problems_are_solvable_in_range_and_splits_disjoint() -> None:
    parts = problems.splits(300, 50, 50)
    for problem in (p for part in parts.values() for p in part):
        assert all(1 <= n <= 99 for n in problem.nums) and 10 <= problem.target <= 100
        assert solve(tuple(sorted(problem.nums, reverse=True)), problem.target) is not None
    train, val, test = (set(parts[k]) for k in ("train", "validation", "test"))
    assert not train & val and not train & test and not val & test
    assert problems.splits(0, 0, 50)["test"] == parts["test"]  # seeded


def test_apply_keeps_positive_exact_small_results() -> None:
    assert apply(7, "/", 2) is None and apply(8, "/", 2) == 4
    assert apply(3, "-", 3) is None and apply(40, "*", 30) is None  # 0, and >= 1000
    assert apply(12, "+", 30) == 42


def test_every_parallel_trace_replays_to_a_valid_answer() -> None:
    for problem in problems.generate(200, seed=11):
        segments = traces.parallel(problem)
        answer = final_answer(traces.thread_text(segments, 0))
        assert answer == "none" or check_answer(problem, answer), (problem, answer)
        for thread in range(1, max(s.thread for s in segments) + 1):
            text = traces.thread_text(segments, thread)
            assert verify_claim(traces.prompt(problem), text), text
        # The sequential trace is the same search: the same answer.
        assert final_answer(traces.sequential(problem)[-1].text) == answer


def test_packed_search_shows_each_thread_exactly_its_context() -> None:
    """The tree mask gives each thread the view Braid gives it: the prompt, each ancestor's
    fork and the thread's header; positions count along that view; and every trained token
    follows its predecessor in the view (so the model's next-token shift is right)."""
    from countdown.train import encode, tree_mask

    tokenizer = build()
    problem = Problem((44, 8, 12, 3), 43)
    segments = traces.parallel(problem)
    example = encode(tokenizer, segments, eos=tokenizer.token_to_id("<eos>"))
    mask, positions = tree_mask(example)
    for index, seg in enumerate(segments):
        if seg.generated:
            assert seg.parent == index - 1
    # A grandchild (a leaf): prompt, root fork, its parent's header and fork, its header, its tries.
    leaf = next(i for i, s in enumerate(segments) if s.generated and s.text.endswith("</Thread>") and i > 4)
    chain = view(segments, leaf)
    assert chain[0] == traces.prompt(problem) and chain[1].startswith("<Parallel>") and len(chain) == 6
    last = max(i for i, s in enumerate(example.segment) if s == leaf)
    seen = [example.ids[j] for j in range(len(example.ids)) if mask[last, j]]
    assert tokenizer.decode(seen) == "".join(chain)
    assert positions[last] == len(seen) - 1
    assert traces.prompt(problem).startswith("44 12 8 3>43")


def test_a_training_sample_of_the_search_keeps_the_winners_and_every_context() -> None:
    """`keep` packs at most that many children per fork, the one that found the target among
    them; each kept thread's view is the same as in the whole search."""
    import random

    problem = Problem((44, 8, 12, 3), 43)
    whole = traces.parallel(problem)
    sample = traces.parallel(problem, keep=2, rng=random.Random(1))
    assert len(sample) < len(whole) and sample[-1].text == whole[-1].text  # the same answer, fewer threads

    def views(segments: list[traces.Segment]) -> set[str]:
        return {"".join(view(segments, index)) for index in range(len(segments))}

    assert views(sample) <= views(whole)
    for index, seg in enumerate(sample):
        if seg.text.startswith("<Parallel>"):
            headers = [s for s in sample if s.parent == index and s.text.startswith("<Thread>")]
            assert 1 <= len(headers) <= 2
    found = [s.text for s in sample if s.generated and "found" in s.text]
    assert "40+3=43:43 found\n</Thread>" in found and "44-12=32,32+8=40,40+3=43 found\n</Thread>" in found


def test_packed_logits_equal_each_thread_run_alone() -> None:
    """The packed batch computes, for every trained token, the logits the model gives that
    token with its thread's view as a plain sequence."""
    import torch
    from transformers import LlamaForCausalLM

    from countdown.train import collate, encode, model_config

    tokenizer = build()
    eos, pad = tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<pad>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(tokenizer.get_vocab_size(), eos, pad, "tiny")).eval()
    segments = traces.parallel(Problem((44, 8, 12, 3), 43))
    example = encode(tokenizer, segments, eos)
    short = encode(tokenizer, traces.parallel(Problem((10, 5, 2, 1), 17)), eos)  # padded in the batch
    batch = collate([example, short], [0, 1], pad, "cpu")
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "weights"}).logits[0]
        for index, seg in enumerate(segments):
            if not seg.generated:
                continue
            chain = view(segments, index)
            alone = model(input_ids=torch.tensor([tokenizer.encode("".join(chain)).ids])).logits[0]
            tokens = [i for i, s in enumerate(example.segment) if s == index]
            n = len(tokenizer.encode(seg.text).ids)
            torch.testing.assert_close(packed[tokens[:n]], alone[-n:], atol=1e-4, rtol=1e-4)


def test_fanout_varies_with_the_problem_and_respects_the_cap() -> None:
    widths = {
        len(traces.search(tuple(sorted(p.nums, reverse=True)), p.target).moves) for p in problems.generate(100, seed=12)
    }
    assert len(widths) >= 3
    capped = traces.search((90, 50, 7, 3), 61, cap=2)
    assert len(capped.moves) <= 2
    assert traces.prompt(Problem((1, 2, 3, 4), 10), threads=2).startswith("T2 ")


@pytest.mark.parametrize(
    ("problem", "kind"),
    [
        (Problem((44, 12, 8, 3), 43), "+-"),  # 44-12=32,32+8=40,40+3=43
        (Problem((37, 16, 32, 6), 14), "*"),  # 37-32=5,6*5=30,30-16=14
        (Problem((55, 35, 24, 10), 12), "/"),  # 55-35=20,24*10=240,240/20=12: a division and a product
        (Problem((55, 17, 4, 42), 57), "none"),  # solvable, not by the search's two root pairs
    ],
)
def test_solution_kind_names_the_operators_the_search_needs(problem: Problem, kind: str) -> None:
    assert traces.solution_kind(problem) == kind
    assert solve(tuple(sorted(problem.nums, reverse=True)), problem.target) is not None


def test_a_fork_where_no_child_found_the_target_joins_none_of_them() -> None:
    """As Braid's first_success join writes it: a failed fork's parent reads `</Parallel>`
    right after its outlines and concludes `none`; a fork with a winner joins it alone."""
    root = traces.search((55, 42, 17, 4), 57, None)  # the search cannot solve it
    assert root.found is None and root.join_text() == "\n</Parallel>\n"
    assert root.text().endswith("</Outlines>\n</Parallel>\nnone\n")
    solved = traces.search((44, 12, 8, 3), 43, None)
    winner = solved.winner
    assert winner is not None
    assert solved.join_text() == f"\n{solved.header(winner)}{solved.children[winner].text()}\n</Parallel>\n"


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        ("44+8=52,52-12=40,40+3=43", True),
        ("44+8=52,52-12=40,40+3=44", False),  # wrong arithmetic
        ("44+8=52,52-12=40,40+40=80", False),  # 40 used twice, 3 unused
        ("44+8=52,52-12=40", False),  # stops early
        ("44+9=53,53-12=41,41+2=43", False),  # numbers that are not the inputs
    ],
)
def test_checker_redoes_the_arithmetic(answer: str, ok: bool) -> None:
    assert check_answer(Problem((44, 8, 12, 3), 43), answer) is ok


def test_held_out_problems_are_drawn_by_the_apr_papers_rules() -> None:
    """Solvable with positive-integer steps of any size (Braid's own problems keep steps below
    1000), distinct in any order, none of the problems left out."""
    assert problems.solvable_any_size((21, 35, 93, 45), 80)  # needs a step above 1000
    assert problems.solve((93, 45, 35, 21), 80) is None
    assert not problems.solvable_any_size((1, 1, 1, 1), 97)
    test = problems.splits(0, 0, 300)["test"]
    drawn = problems.held_out(30, seed=7, exclude=set(test))
    keys = {(tuple(sorted(p.nums)), p.target) for p in drawn}
    assert len(keys) == 30 and not keys & {(tuple(sorted(p.nums)), p.target) for p in test}
    assert all(problems.solvable_any_size(p.nums, p.target) and 10 <= p.target <= 100 for p in drawn)
    assert all(1 <= n <= 99 for p in drawn for n in p.nums)
    assert problems.held_out(30, seed=7, exclude=set(test)) == drawn  # seeded
    assert problems.held_out(30, seed=7, exclude=set(drawn[:5]))[:5] != drawn[:5]


def test_verifier_rejects_a_wrong_found_and_passes_honest_threads() -> None:
    prompt = "44 8 12 3>43\n"
    assert verify_claim(prompt, "...\n52-12=40,40+3=43 found\n</Thread>")
    assert not verify_claim(prompt, "...\n52-12=40,40+3=44 found\n</Thread>")  # wrong sum
    assert not verify_claim(prompt, "...\n52-12=41,41+3=44 found\n</Thread>")  # wrong target
    assert not verify_claim(prompt, "52-12=40,30+13=43 found\n</Thread>")  # broken chain
    assert verify_claim(prompt, "...\n44+8=52,52-12=40,40+3=43 found\n</Thread>")  # a whole chain
    assert not verify_claim(prompt, "...\n44+9=53,53-13=40,40+3=43 found\n</Thread>")  # not the inputs
    assert not verify_claim("T2 " + prompt, "44+8=52,52-12=40,40+3=43,43-0=43 found")  # 4 steps from 4 numbers
    assert verify_claim(prompt, "40+3=44\nnone\n</Thread>") and not claims_found("40+3=44\nnone\n</Thread>")


def test_tokenizer_round_trips_and_loads_with_auto_tokenizer(tmp_path: Path) -> None:
    tokenizer = build()
    outline = "<Parallel>\n<Outlines>\n<Outline>44+8=52:52 12 3>43</Outline>\n"
    text = traces.prompt(Problem((44, 8, 12, 3), 43)) + outline
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text and ids.count(tokenizer.token_to_id("<Outline>")) == 1
    save(tokenizer, tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.decode(auto.encode(text, add_special_tokens=False)) == text
    assert auto.eos_token == "<eos>"


def test_a_few_training_steps_lower_the_loss(tmp_path: Path) -> None:
    from countdown.train import main

    main(["--out", str(tmp_path), "--problems", "60", "--steps", "60", "--size", "tiny",
          "--batch-tokens", "2048", "--lr", "3e-3", "--save-every", "60"])  # fmt: skip
    state = json.loads((tmp_path / "training.json").read_text())
    losses = [loss for _, loss in __import__("torch").load(tmp_path / "train_state.pt", weights_only=False)["losses"]]
    assert state["steps"] == 60 and losses[-1] < losses[0] - 0.2  # nats, averaged over steps 1-25 vs 51-60
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "tokenizer.json").exists()


def test_loss_weighs_the_root_the_verdicts_and_the_chains() -> None:
    """Given tokens weigh 0; the root's 4x; a try's verdict 10x; a line carrying a chain
    (a child's conclusion, the answer) 10x — the root's answer both, 40x."""
    from countdown.train import encode

    tokenizer = build()
    problem = Problem((44, 12, 8, 3), 43)
    segments = traces.parallel(problem)
    example = encode(tokenizer, segments, tokenizer.token_to_id("<eos>"), 4.0, 10.0, 10.0)

    def weights(index: int) -> list[float]:
        return [w for w, s in zip(example.loss, example.segment, strict=True) if s == index]

    # A verdict is any space or new line right after a number, so it also marks a chain's end.
    answer = len(segments) - 1
    assert segments[answer].text == "44-12=32,32+8=40,40+3=43\n"
    assert weights(answer) == [40.0] * 24 + [400.0, 4.0]  # the chain, its new line (a verdict too), <eos>
    child = segments.index(traces.Segment("44-12=32,32+8=40,40+3=43 found\n</Thread>", True, 48, 12))
    assert weights(child) == [10.0] * 24 + [100.0] + [10.0] * 6 + [1.0]  # the chain, ` found`, `</Thread>`
    leaf = segments.index(traces.Segment("40+3=43:43 found\n</Thread>", True, 28, 13))
    assert weights(leaf) == [1.0] * 10 + [10.0] + [1.0] * 7  # only its verdict weighs more
    assert all(w == 0 for i, s in enumerate(segments) if not s.generated for w in weights(i))


def test_oversampling_repeats_the_problems_whose_solution_needs_a_product_or_a_division() -> None:
    from collections import Counter

    from countdown.train import examples

    tokenizer = build()
    eos = tokenizer.token_to_id("<eos>")
    train = problems.splits(40, 0, 0)["train"]
    kinds = {traces.prompt(p): traces.solution_kind(p) for p in train}

    def copies(oversample: int) -> Counter[str]:
        data = examples("parallel", 40, 0, tokenizer, eos, keep=2, oversample=oversample)
        prompts = (tokenizer.decode([t for t, s in zip(e.ids, e.segment, strict=True) if s == 0]) for e in data)
        return Counter(re.sub(r"^T\d+ ", "", text) for text in prompts)  # the same problem under any fan-out cap

    # A copy whose search (under its own fan-out cap) is too long to train on is left out: rare.
    once, thrice = copies(1), copies(3)
    assert max(once.values()) == 1 and {"*", "/", "+-"} <= {kinds[p] for p in thrice}
    assert all(n <= (3 if kinds[p] in ("*", "/") else 1) for p, n in thrice.items())
    hard = [n for p, n in thrice.items() if kinds[p] in ("*", "/")]
    assert sum(hard) >= 2.5 * len(hard)


def test_training_resumes_where_it_stopped(tmp_path: Path) -> None:
    from countdown.train import main

    common = [
        "--out",
        str(tmp_path),
        "--problems",
        "40",
        "--size",
        "tiny",
        "--batch-tokens",
        "1024",
        "--save-every",
        "5",
    ]
    main([*common, "--steps", "10"])
    main([*common, "--steps", "15", "--resume"])
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == 15


# Test problems the shipped model solves (found by `countdown.evaluate` on the test split;
# it solves about half of them): a regression guard that it still reasons to right answers.
SOLVED = [Problem((73, 23, 26, 33), 57), Problem((57, 63, 24, 8), 12), Problem((77, 27, 60, 75), 93),
          Problem((77, 4, 13, 26), 42)]  # fmt: skip


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped checkpoint")
def test_shipped_checkpoint_runs_as_served_and_solves_fixed_problems() -> None:
    """The shipped model loads and runs as served: it forks (its own fan-out), nested
    threads join, every answer is checked exactly, no KV is left behind, and it solves a
    handful of fixed problems."""
    from countdown.evaluate import evaluate, summary
    from engine.engine import Engine

    engine = Engine(SHIPPED, kv_cache_bytes=256 * 2**20)  # 12 searches of ~40 threads at once
    fixed = problems.splits(0, 0, 8)["test"] + SOLVED
    outcomes = evaluate(SHIPPED, fixed, progress=False, engine=engine, concurrency=16)
    assert all(o.result.finish_reason in ("stop", "length") for o in outcomes)
    assert all(o.root_fanout >= 2 for o in outcomes)  # every root forks
    assert any(node.depth == 2 for o in outcomes for node in o.result.threads)  # children fork too
    assert all(final_answer(o.result.text) for o in outcomes)
    assert [o.correct for o in outcomes[-len(SOLVED) :]] == [True] * len(SOLVED)
    by_solution = summary(outcomes)["by_solution"]
    assert sum(row["n"] for row in by_solution.values()) == len(outcomes)
    assert by_solution["none"]["accuracy"] == 0  # what the search cannot solve, its model cannot either
    engine.cache.check_integrity()
    assert engine.cache.stats().used_blocks == 0


def test_diagnose_counts_every_step_of_the_search_once() -> None:
    """The teacher-forced diagnosis sees each generated segment once, sorted by kind, each
    leaf verdict once and each computed result once (by operator and size); a step is exact
    only when all its tokens are."""
    import torch
    from transformers import LlamaForCausalLM

    from countdown.diagnose import RESULT, diagnose
    from countdown.train import model_config

    tokenizer = build()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        model_config(tokenizer.get_vocab_size(), tokenizer.token_to_id("<eos>"), tokenizer.token_to_id("<pad>"), "tiny")
    ).eval()
    chosen = problems.generate(3, seed=13)
    result = diagnose(model, chosen)
    searches = [traces.parallel(p) for p in chosen]
    generated = [s for segs in searches for s in segs if s.generated]
    leaves = [s.text for s in generated if not s.text.startswith("<Parallel>")]
    leaf_tries = [line for text in leaves for line in text.splitlines() if ":" in line]  # `a+b=r:T` lines
    ends = {kind: row["steps"] for kind, row in result.items() if kind.endswith((" end", " chain"))}
    assert result["root fork"]["steps"] == ends.get("root end", 0) + ends.get("root chain", 0) == 3
    chains = [s for s in generated if s.thread != 0 and "," in s.text]
    assert ends.get("child chain", 0) == len(chains)  # a child that found the target concludes with its chain
    assert result["leaf hit"]["steps"] == sum(line.endswith(" found") for line in leaf_tries)
    assert result["leaf miss"]["steps"] == sum(not line.endswith(" found") for line in leaf_tries)
    computed = [m for s in generated if "," not in s.text for m in RESULT.finditer(s.text)]  # chains: copies
    arithmetic = {kind: row["steps"] for kind, row in result.items() if kind.startswith(("outline ", "try "))}
    assert sum(arithmetic.values()) == len(computed)
    products = [m for m in computed if m[1] == "*" and len(m[2]) == 3 and m.string.startswith("<Parallel>")]
    assert arithmetic.get("outline * 3d", 0) == len(products)
    assert all(0 <= row["exact"] <= row["token_accuracy"] <= 1 for row in result.values())
