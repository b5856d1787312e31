"""Train the embedded Countdown model from scratch: a small Llama on search traces.

    python -m countdown.train --out countdown/model            # the parallel model
    python -m countdown.train --format sequential --out ...    # the sequential baseline

Each thread of a parallel trace is one training sequence, with the context it sees when
Braid runs it; the loss covers only the tokens the thread generates itself. Seeded and
resumable (`--resume` continues from `OUT/train_state.pt`), with a progress bar, and a
loss curve saved to `OUT/loss.png`. Runs on CUDA when present, else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from countdown import problems, traces
from countdown.tokenizer import EOS, PAD, build, save

# Longer sequences are skipped: for parallel traces, rare root contexts after an all-failed
# fork; sequential traces are one long thread each.
MAX_LEN = {"parallel": 512, "sequential": 1536}
LEAVES_PER_PROBLEM = 3  # leaves (2-number threads) are most threads: keep the found ones and a few others


def model_config(vocab: int, eos: int, pad: int, size: str = "small") -> LlamaConfig:
    dims = {"tiny": (64, 2, 4, 2), "small": (256, 4, 8, 4)}[size]  # hidden, layers, heads, kv heads
    hidden, layers, heads, kv = dims
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 16 * 16 + 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )


def encode(tokenizer, trace: traces.ThreadTrace, eos: int) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): 1 on the tokens the thread generates itself."""
    ids = tokenizer.encode(trace.context).ids
    mask = [0] * len(ids)
    for text, generated in trace.segments:
        part = tokenizer.encode(text).ids
        ids += part
        mask += [int(generated)] * len(part)
    if trace.ends_with_eos:
        ids.append(eos)
        mask.append(1)
    return ids, mask


def examples(fmt: str, count: int, seed: int, tokenizer, eos: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for problem in problems.splits(count, 0, 0)["train"]:
        threads = traces.sample_threads(rng)
        if fmt == "sequential":
            chosen = [traces.sequential(problem, threads)]
        else:
            all_threads = traces.parallel(problem, threads)
            leaves = [t for t in all_threads if not any(g for _, g in t.segments[1:])]
            inner = [t for t in all_threads if t not in leaves]
            found = [t for t in leaves if "found" in t.segments[0][0]]
            others = [t for t in leaves if t not in found]
            rng.shuffle(others)
            chosen = inner + found + others[: max(0, LEAVES_PER_PROBLEM - len(found))]
        for trace in chosen:
            ids, mask = encode(tokenizer, trace, eos)
            if len(ids) <= MAX_LEN[fmt]:
                out.append((ids, mask))
    return out


def batches(data: list, batch_tokens: int, rng: random.Random):
    """Length-bucketed batches of about `batch_tokens` (padded) tokens, forever."""
    while True:
        order = sorted(range(len(data)), key=lambda i: (len(data[i][0]), rng.random()))
        groups, group, width = [], [], 0
        for i in order:
            width = max(width, len(data[i][0]))
            if group and width * (len(group) + 1) > batch_tokens:
                groups.append(group)
                group, width = [], len(data[i][0])
            group.append(i)
        groups.append(group)
        rng.shuffle(groups)
        yield from groups


def collate(data: list, group: list[int], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(data[i][0]) for i in group)
    ids = torch.full((len(group), width), pad, dtype=torch.long)
    labels = torch.full((len(group), width), -100, dtype=torch.long)
    for row, i in enumerate(group):
        tokens, mask = data[i]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, : len(tokens)] = torch.tensor([t if m else -100 for t, m in zip(tokens, mask, strict=True)])
    return ids.to(device), labels.to(device)


def plot(losses: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set(xlabel="step", ylabel="loss (generated tokens)", yscale="log", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("countdown/model"))
    parser.add_argument("--format", choices=["parallel", "sequential"], default="parallel")
    parser.add_argument("--problems", type=int, default=20_000, help="training problems")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (a new schedule)")
    parser.add_argument("--save-every", type=int, default=250)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build()
    eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)

    started = time.time()
    data = examples(args.format, args.problems, args.seed, tokenizer, eos)
    tokens = sum(len(ids) for ids, _ in data)
    print(f"{len(data)} sequences, {tokens} tokens from {args.problems} problems ({time.time() - started:.0f}s)")

    config = model_config(tokenizer.get_vocab_size(), eos, pad, args.size)
    model = LlamaForCausalLM(config).to(device)
    if args.init_from:
        model.load_state_dict(LlamaForCausalLM.from_pretrained(args.init_from).state_dict())
        print(f"initialised from {args.init_from}")
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_file = args.out / "train_state.pt"
    step, losses, seen_tokens, elapsed = 0, [], 0, 0.0
    if args.resume and state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses, seen_tokens, elapsed = state["step"], state["losses"], state["tokens"], state["elapsed"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}")
    batch_iter = batches(data, args.batch_tokens, rng)
    for _ in range(step):  # the same batches as an uninterrupted run
        next(batch_iter)

    def lr_at(s: int) -> float:
        warmup = max(1, args.steps // 20)
        if s < warmup:
            return args.lr * (s + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup)))

    model.train()
    progress = tqdm(total=args.steps, initial=step, desc=f"train {args.format} ({params / 1e6:.1f}M params)")
    window: list[float] = []
    run_start = time.time()
    while step < args.steps:
        ids, labels = collate(data, next(batch_iter), pad, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        seen_tokens += ids.numel()
        window.append(loss.item())
        if step % 25 == 0 or step == args.steps:
            losses.append((step, sum(window) / len(window)))
            window = []
            progress.set_postfix(loss=f"{losses[-1][1]:.3f}")
        progress.update(1)
        if step % args.save_every == 0 or step == args.steps:
            now = elapsed + time.time() - run_start
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "losses": losses,
                    "tokens": seen_tokens,
                    "elapsed": now,
                    "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                },
                state_file,
            )
            model.save_pretrained(args.out)
            save(tokenizer, args.out)
            plot(losses, args.out / "loss.png", f"Countdown {args.format}, {params / 1e6:.1f}M params")
            info = {
                "format": args.format,
                "params": params,
                "steps": step,
                "tokens": seen_tokens,
                "train_seconds": round(now),
                "problems": args.problems,
                "device": device,
                "final_loss": losses[-1][1] if losses else None,
                "init_from": str(args.init_from) if args.init_from else None,
            }
            (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    progress.close()


if __name__ == "__main__":
    main()
