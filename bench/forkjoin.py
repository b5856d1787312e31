"""Fork-join on one replica: children in parallel vs the same engine running them in turn.

Forced workload (a real engine run of a random-weight ~3M Llama, its sampling forced to
a script): a 256-token prompt; the root writes a Multiverse fork into 8 children; each
child writes 128 tokens; the root writes a 64-token conclusion. The peer is the same
engine and request with `max_threads=1`, so the children run one after another.

    parallel efficiency = (T_seq / T_par) / (total tokens / critical-path tokens)

1.0 means the children cost no more than one child. Also reported: KV bytes held at the
peak against copying the prefix into every child. Prints a table, then one line of JSON.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from transformers import LlamaConfig

from engine.forkjoin import ForkJoinEngine
from engine.sampling import SamplingParams
from engine.threads import ForkJoinOptions, ForkJoinResult
from tests.checkpoints import make_checkpoint
from tests.scripted import EOS, protocol_tokenizer, scripted_engine

CHILDREN, CHILD_TOKENS, PROMPT_TOKENS, CONCLUSION_TOKENS = 8, 128, 256, 64
BLOCK = 16  # the engine's default block size


def make_small_checkpoint(folder: Path) -> Path:
    tokenizer = protocol_tokenizer(tags_as_tokens=True)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        eos_token_id=tokenizer.token_to_id(EOS),
    )
    make_checkpoint("llama", folder, config=config)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def scripts() -> dict[str, str]:
    outlines = "".join(f"<Outline>{i}</Outline>" for i in range(CHILDREN))
    root = f"<Parallel><Goal>{outlines}</Goal>" + "c" * CONCLUSION_TOKENS
    children = {f"<Path>\n{i + 1}:": "x" * (CHILD_TOKENS - 1) + "</Path>" for i in range(CHILDREN)}
    return {"q" * PROMPT_TOKENS: root, **children}


def run_once(path: Path, max_threads: int) -> tuple[float, ForkJoinResult, int]:
    engine, _ = scripted_engine(path, scripts(), kv_cache_bytes=64 * 2**20, block_size=BLOCK)
    fj = ForkJoinEngine(engine)
    options = ForkJoinOptions(
        protocol="multiverse",
        max_threads=max_threads,
        child_max_tokens=CHILD_TOKENS + 8,
        sampling=SamplingParams(max_new_tokens=1000),
    )
    start = time.perf_counter()
    (result,) = fj.run(["q" * PROMPT_TOKENS], options)
    elapsed = time.perf_counter() - start
    assert result.finish_reason == "stop" and all(n.status in ("joined", "done") for n in result.threads)
    return elapsed, result, engine.cache.config.bytes_per_block


def main() -> None:
    path = make_small_checkpoint(Path(tempfile.mkdtemp(prefix="braid-bench-forkjoin-")))
    run_once(path, 16)  # warm-up
    par = [run_once(path, 16) for _ in range(3)]
    seq = [run_once(path, 1) for _ in range(3)]
    t_par = statistics.median(t for t, _, _ in par)
    t_seq = statistics.median(t for t, _, _ in seq)
    _, result, bytes_per_block = par[0]
    ideal = result.usage.generated_tokens / result.usage.critical_path_tokens
    efficiency = (t_seq / t_par) / ideal
    # The peer layout: every child holds its own copy of the whole prefix plus its branch.
    root_before_fork = result.threads[0].generated_tokens - CONCLUSION_TOKENS - 1  # less the conclusion and EOS
    child_header = 4  # "<Path>", "\n", digit, ":"
    per_child_tokens = PROMPT_TOKENS + root_before_fork + child_header + CHILD_TOKENS
    per_child_blocks = -(-per_child_tokens // BLOCK)
    copy_bytes = CHILDREN * per_child_blocks * bytes_per_block
    held_over_copy = result.cache["used_bytes"] / copy_bytes
    print(f"fork into {CHILDREN} x {CHILD_TOKENS} tokens after a {PROMPT_TOKENS}-token prompt, ~3M Llama, CPU")
    print(f"{'mode':<34} {'wall s':>8}")
    print(f"{'parallel (max_threads=16)':<34} {t_par:>8.3f}")
    print(f"{'one after another (max_threads=1)':<34} {t_seq:>8.3f}")
    print(f"speedup {t_seq / t_par:.2f}x of an ideal {ideal:.2f}x -> parallel efficiency {efficiency:.2f}")
    print(
        f"KV held at peak {result.cache['used_bytes'] / 2**20:.2f} MiB vs {copy_bytes / 2**20:.2f} MiB "
        f"copying the prefix per child ({held_over_copy:.2f}x)"
    )
    print(
        json.dumps(
            {
                "bench": "forkjoin",
                "parallel_efficiency": efficiency,
                "kv_held_over_copy": held_over_copy,
                "speedup": t_seq / t_par,
                "ideal_speedup": ideal,
            }
        )
    )


if __name__ == "__main__":
    main()
