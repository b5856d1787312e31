"""Braid's engine against transformers' generate() on the same checkpoint, in the same run.

Random-weight Llama checkpoints (nothing downloaded): a small one (~3M parameters, the
embedded model's size) and a larger one (~100M). Measured, each the median of repeats:
- decode tokens/s at batch 1 (128 new tokens after a 16-token prompt);
- decode tokens/s of 16 threads sharing a 512-token prefix (small config): Braid forks
  one prefilled thread 16 ways; generate() runs the 16 prompts as one batch;
  decode-only rates (generate(): time for n tokens minus time for 1);
  transformers' continuous-batching generate_batch() too, where it runs;
- time to first token for a 512-token prompt.
Braid's decode rates on the small config are measured three ways: as configured by
default (the fused C++ decode step on CPU in fp32, FlexAttention on CUDA) and with every
step in PyTorch, decode attention gathering each context (`attention="gather"`) or reading
the pool in place through FlexAttention (`attention="flex"`).
All run on `--device` (cpu, cuda) in `--dtype` (float32, bfloat16, float16), the same
for both. Prints a table, then one line of JSON (speedups are Braid / generate()).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

from engine.engine import Engine
from engine.model import DTYPES
from engine.model_runner import ATTENTION
from engine.sampling import SamplingParams

CONFIGS = {
    "small-3M": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8),
    "large-100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
}
VOCAB = {"small-3M": 512, "large-100M": 32000}


def make_checkpoint(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB[name], num_key_value_heads=4, max_position_embeddings=2048, eos_token_id=None, **CONFIGS[name]
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync() -> None:
    """Wait for the GPU's queued work, so that a time is the work's, not its launch's."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Braid:
    def __init__(self, path: Path, device: str, dtype: str, attention: str | None = None) -> None:
        """`attention` None: the defaults; else every step in PyTorch with that decode attention."""
        self.engine = Engine(
            path, device, dtype, kv_cache_bytes=256 * 2**20, fused_decode=attention is None, attention=attention
        )

    def decode(self, prompt: list[int], n: int) -> None:
        self.engine.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))

    def forked_decode_seconds(self, prefix: list[int], n: int, width: int) -> float:
        """Seconds for `width` children of a prefilled prefix to decode n tokens each."""
        root = self.engine.add_thread(prefix, SamplingParams(max_new_tokens=2, ignore_eos=True))
        while root.num_generated == 0:
            self.engine.step()
        start = time.perf_counter()
        children = self.engine.fork(
            root, [[i + 3] for i in range(width)], SamplingParams(max_new_tokens=n, ignore_eos=True)
        )
        while any(c.finish_reason is None for c in children):
            self.engine.step()
        sync()
        elapsed = time.perf_counter() - start
        self.engine.cancel(root)
        return elapsed

    def first_token(self, prompt: list[int]) -> None:
        self.engine.generate([prompt], SamplingParams(max_new_tokens=1))


class HF:
    def __init__(self, path: Path, device: str, dtype: str) -> None:
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()

    def generate(self, prompts: list[list[int]], n: int) -> None:
        with torch.inference_mode():
            self.model.generate(
                torch.tensor(prompts, device=self.device), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                pad_token_id=0,
            )  # fmt: skip

    def generate_batch(self, prompts: list[list[int]], n: int) -> None:
        config = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=-1, pad_token_id=0)
        with torch.inference_mode():
            self.model.generate_batch(prompts, generation_config=config, progress_bar=False)


def bench(name: str, repeats: int, new_tokens: int, width: int, device: str, dtype: str) -> dict:
    folder = make_checkpoint(name, Path(tempfile.mkdtemp(prefix=f"braid-bench-{name}-")))
    braid, hf = Braid(folder, device, dtype), HF(folder, device, dtype)
    vocab = VOCAB[name]
    prompt, long_prompt = tokens(16, vocab, 1), tokens(512, vocab, 2)
    r = {"config": name}
    r["braid_b1"] = new_tokens / median_time(lambda: braid.decode(prompt, new_tokens), repeats)
    steps = {a: Braid(folder, device, dtype, a) for a in (ATTENTION if width else ())}
    for a, engine in steps.items():
        r[f"{a}_b1"] = new_tokens / median_time(lambda e=engine: e.decode(prompt, new_tokens), repeats)
    r["hf_b1"] = new_tokens / median_time(lambda: hf.generate([prompt], new_tokens), repeats)
    fresh = itertools.count(10)  # a new prompt each time: no prefix-cache hit
    r["braid_ttft_ms"] = 1000 * median_time(lambda: braid.first_token(tokens(512, vocab, next(fresh))), repeats)
    r["hf_ttft_ms"] = 1000 * median_time(lambda: hf.generate([long_prompt], 1), repeats)
    if width:
        n = new_tokens // 2
        prompts = [long_prompt + [i + 3] for i in range(width)]
        for key, engine in ((f"braid_b{width}", braid), *((f"{a}_b{width}", e) for a, e in steps.items())):
            seconds = statistics.median(engine.forked_decode_seconds(long_prompt, n, width) for _ in range(repeats))
            r[key] = width * n / seconds
        t_n = median_time(lambda: hf.generate(prompts, n), repeats)
        t_1 = median_time(lambda: hf.generate(prompts, 1), repeats)
        r[f"hf_b{width}"] = width * (n - 1) / (t_n - t_1)
        try:
            r[f"hf_batch_b{width}"] = width * n / median_time(lambda: hf.generate_batch(prompts, n), 1)
        except Exception as err:  # a peer that does not run here is reported, not hidden
            print(f"generate_batch failed on {name}: {type(err).__name__}: {err}")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.dtype}")
    small = bench("small-3M", args.repeats, args.new_tokens, 16, args.device, args.dtype)
    large = bench("large-100M", max(1, args.repeats - 1), args.new_tokens // 2, 0, args.device, args.dtype)
    print(
        f"{'config':<12} {'metric':<34} {'braid':>10} {'generate()':>11} {'ratio':>7}"
        + "".join(f" {'PyTorch, ' + a:>20}" for a in ATTENTION)
    )
    rows = [
        ("decode tok/s, batch 1", "braid_b1", "hf_b1", "_b1"),
        ("decode tok/s, 16 threads, 512 prefix", "braid_b16", "hf_b16", "_b16"),
        ("TTFT ms, 512-token prompt", "braid_ttft_ms", "hf_ttft_ms", None),
    ]
    for r in (small, large):
        for label, b, h, suffix in rows:
            if b in r:
                ratio = r[h] / r[b] if "ttft" in b else r[b] / r[h]
                steps = [r[a + suffix] for a in ATTENTION if suffix and a + suffix in r]
                cells = "".join(f" {f'{x:.1f} ({x / r[h]:.2f}x)':>20}" for x in steps)
                print(f"{r['config']:<12} {label:<34} {r[b]:>10.1f} {r[h]:>11.1f} {ratio:>6.2f}x{cells}")
        if "hf_batch_b16" in r:
            print(f"{r['config']:<12} {'generate_batch() tok/s, 16 threads':<34} {'':>10} {r['hf_batch_b16']:>11.1f}")
    print(
        json.dumps(
            {
                "bench": "engine",
                "device": args.device,
                "dtype": args.dtype,
                "speedup_b1": small["braid_b1"] / small["hf_b1"],
                "speedup_b16": small["braid_b16"] / small["hf_b16"],
                "speedup_large_b1": large["braid_b1"] / large["hf_b1"],
                "ttft_speedup_small": small["hf_ttft_ms"] / small["braid_ttft_ms"],
                "ttft_speedup_large": large["hf_ttft_ms"] / large["braid_ttft_ms"],
                "flex_vs_gather_b1": small["flex_b1"] / small["gather_b1"],
                "flex_vs_gather_b16": small["flex_b16"] / small["gather_b16"],
            }
        )
    )


if __name__ == "__main__":
    main()
