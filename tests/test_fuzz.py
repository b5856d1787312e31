"""Hostile model output, fuzzed: every thread of a real engine is made to write a random
stream of protocol tags and text (hypothesis draws the seed and the budgets), so runaway
forks, deep nesting, threads that never end, stray and half-written tags all happen,
split over tokens whichever way the tokenizer cuts them.

Whatever the model writes, a request ends within its token budget and a bounded number of
engine steps, no exception escapes, and the cache is intact with nothing left in use.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.engine import Engine
from engine.forkjoin import ForkJoinEngine
from engine.protocols import PROTOCOLS
from engine.sampling import SamplingParams
from engine.scheduler import Thread
from engine.threads import ForkJoinOptions
from tests.scripted import EOS, TAGS, make_protocol_checkpoint

PIECES = [*TAGS, "<Outline>1: a</Outline>", "<Path>\n1:", "<Thread>\n1:", "<", ">", "\n", "x", "12+3=15", " "]
FORK_CHANCE = 0.15  # of a piece being a whole, well-formed fork block (of a random protocol): runaway forks


def fork_block(rng: random.Random) -> str:
    """A fork of 1..6 children in one of the three formats (so some match the request's protocol)."""
    n = rng.randint(1, 6)
    outlines = "".join(f"<Outline>{i}: try {i}</Outline>" for i in range(1, n + 1))
    spawns = "".join(f"<Start Sub Search {i} at level 1> node {i}\n" for i in range(n))
    return rng.choice([
        f"<Parallel><Goal>{outlines}</Goal>",
        f"<Parallel><Outlines>{outlines}</Outlines>",
        f"<Calling Sub Searches>\n{spawns}<End Calling Sub Searches>",
    ])  # fmt: skip


MAX_STEPS_PER_TOKEN = 8  # steps a request may take per token it may generate (prefills, joins, waits)


class RandomWriter:
    """Logits processor: each thread writes random pieces from its own seeded stream, forever
    unless the stream draws EOS (drawn with `eos_chance` per piece)."""

    def __init__(self, engine: Engine, seed: int, eos_chance: float) -> None:
        self.tokenizer = engine.tokenizer
        self.eos = engine.tokenizer.token_to_id(EOS)
        self.seed, self.eos_chance = seed, eos_chance
        self.streams: dict[int, tuple[random.Random, list[int]]] = {}

    def next_token(self, thread: Thread) -> int:
        rng, pending = self.streams.setdefault(
            thread.thread_id, (random.Random(self.seed * 7919 + thread.thread_id), [])
        )
        if not pending:
            if rng.random() < self.eos_chance:
                return self.eos
            piece = fork_block(rng) if rng.random() < FORK_CHANCE else rng.choice(PIECES)
            pending.extend(self.tokenizer.encode(piece).ids)
        return pending.pop(0)

    def __call__(self, threads: list[Thread], logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, float("-inf"))
        for row, thread in enumerate(threads):
            forced[row, self.next_token(thread)] = 0.0
        return forced


@pytest.fixture(scope="module", params=[True, False], ids=["tags-as-tokens", "tags-byte-by-byte"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_protocol_checkpoint(tmp_path_factory.mktemp("fuzz"), tags_as_tokens=request.param)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10**6),
    protocol=st.sampled_from(sorted(PROTOCOLS)),
    join_policy=st.sampled_from(["all", "first_success", "vote"]),
    eos_chance=st.sampled_from([0.0, 0.02, 0.2]),
    max_total_tokens=st.integers(20, 300),
    max_depth=st.integers(0, 4),
    kv_blocks=st.sampled_from([24, 64, 512]),
)
def test_random_output_ends_within_budgets_and_leaves_the_cache_intact(
    ckpt: Path, seed: int, protocol: str, join_policy: str, eos_chance: float, max_total_tokens: int,
    max_depth: int, kv_blocks: int,
) -> None:  # fmt: skip
    probe = Engine(ckpt, kv_cache_bytes=2**20, block_size=8)
    engine = Engine(ckpt, kv_cache_bytes=kv_blocks * probe.cache.config.bytes_per_block, block_size=8)
    engine.logits_processor = RandomWriter(engine, seed, eos_chance)
    fj = ForkJoinEngine(engine)
    options = ForkJoinOptions(
        protocol=protocol, join_policy=join_policy, max_threads=4, max_fanout=4, max_depth=max_depth,
        max_total_tokens=max_total_tokens, child_max_tokens=40,
        sampling=SamplingParams(max_new_tokens=max_total_tokens),
    )  # fmt: skip
    request_id = fj.submit("Q:", options)
    results, steps = [], 0
    while not results:
        results = fj.step()
        steps += 1
        assert steps <= MAX_STEPS_PER_TOKEN * max_total_tokens + 50, "the request does not end"
    (result,) = results
    assert result.request_id == request_id
    assert result.finish_reason in ("stop", "length", "out_of_blocks")
    assert result.usage.generated_tokens <= max_total_tokens
    assert max(node.depth for node in result.threads) <= max_depth
    assert len(result.threads) <= 1 + options.max_fanout * max_total_tokens
    assert all(node.status != "running" for node in result.threads)
    engine.cache.check_integrity()
    assert engine.cache.stats().used_blocks == 0 and not engine.has_work()
