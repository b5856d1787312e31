"""Train the embedded Countdown model from scratch: a small Llama on search traces.

    python -m countdown.train --out countdown/model            # the parallel model
    python -m countdown.train --format sequential --out ...    # the sequential baseline

A parallel trace is a tree of threads; training packs the whole tree into one sequence
with a tree attention mask and per-thread position ids, so every thread sees exactly the
context it sees when Braid runs it while a shared context is computed once (a thread's
view: its chain of parent segments). The loss covers only the tokens the model
generates itself. Seeded and resumable (`--resume` continues from
`OUT/train_state.pt`), with a progress bar, a loss curve saved to `OUT/loss.png`, and
an optional wall-clock budget (`--minutes`) that the learning-rate schedule follows.
Runs on CUDA when present (bf16 autocast), else on the CPU; `make gpu-train` continues
both shipped models on a GPU with the same budget each.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from countdown import problems, traces
from countdown.tokenizer import EOS, PAD, build, save

MAX_LEN = 2048  # longer packed searches are skipped (the trained context)


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


@dataclass(slots=True, frozen=True)
class Example:
    """One packed search: tokens, what is trained on, and the tree the mask is built from."""

    ids: list[int]
    loss: list[float]  # weight of each token in the loss: 0 on given tokens, more on the root's
    segment: list[int]  # segment index of each token
    parents: list[int]  # parent segment index of each segment (-1: none)


def encode(
    tokenizer,
    segments: list[traces.Segment],
    eos: int,
    root_weight: float = 1.0,
    decision_weight: float = 1.0,
    chain_weight: float = 1.0,
) -> Example:
    """Tokens of every segment in order; the root's answer (the last segment) ends with EOS.

    The root's own tokens weigh `root_weight` in the loss: a search has one root and dozens
    of threads, yet every answer starts with the root's outlines. A space or new line
    right after a number (a try's verdict: ` found` or not) weighs `decision_weight`:
    the rare hits otherwise teach only the prior. A line that carries a chain (a conclusion,
    the answer: `37-32=5,6*5=30,30-16=14`) weighs `chain_weight`: one line of a search, and
    the one the verifier checks (a child that miscopied its grandchild's move is rejected,
    and the search found nothing)."""
    ids: list[int] = []
    loss: list[float] = []
    segment: list[int] = []
    for index, seg in enumerate(segments):
        part = tokenizer.encode(seg.text).ids + ([eos] if index == len(segments) - 1 else [])
        weight = (root_weight if seg.thread == 0 else 1.0) * seg.generated
        loss += [
            weight * (decision_weight if verdict else 1.0) * (chain_weight if chain else 1.0)
            for verdict, chain in zip(verdicts(tokenizer, part), chain_lines(tokenizer, part), strict=True)
        ]
        ids += part
        segment += [index] * len(part)
    return Example(ids, loss, segment, [-1 if s.parent is None else s.parent for s in segments])


def verdicts(tokenizer, ids: list[int]) -> list[bool]:
    """Which tokens are a try's verdict: the space of ` found`, or a new line, right after a number."""
    space, newline, f = (tokenizer.token_to_id(c) for c in (" ", "\n", "f"))
    digits = {tokenizer.token_to_id(str(d)) for d in range(10)}
    return [
        i > 0 and ids[i - 1] in digits and (t == newline or (t == space and ids[i + 1 : i + 2] == [f]))
        for i, t in enumerate(ids)
    ]


def chain_lines(tokenizer, ids: list[int]) -> list[bool]:
    """Which tokens are on a line that carries a chain of moves (has a comma), its new line included."""
    newline, comma = tokenizer.token_to_id("\n"), tokenizer.token_to_id(",")
    marks: list[bool] = []
    line: list[int] = []
    for t in ids:
        line.append(t)
        if t == newline:
            marks += [comma in line] * len(line)
            line = []
    return marks + [comma in line] * len(line)


def tree_mask(example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask [L, L] bool, position ids [L]) of a packed search.

    Token i sees token j when j's segment is on i's chain of parent segments (or is i's
    own segment and j <= i): exactly what the thread sees when Braid runs it. A token's
    position is its index in that thread's view."""
    count = len(example.parents)
    sees = torch.eye(count, dtype=torch.bool)  # [segments, segments]: row sees column
    for index, parent in enumerate(example.parents):
        if parent >= 0:
            sees[index] |= sees[parent]
    segment = torch.tensor(example.segment)
    mask = sees[segment][:, segment] & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    return mask, mask.sum(dim=1) - 1


def examples(
    fmt: str,
    count: int,
    seed: int,
    tokenizer,
    eos: int,
    root_weight: float = 1.0,
    keep: int = 0,
    decision_weight: float = 1.0,
    chain_weight: float = 1.0,
    oversample: int = 1,
) -> list[Example]:
    """The training searches. A problem whose search's solution needs a product or a division
    enters `oversample` times, each with its own fan-out cap and kept children: the arithmetic
    the models get wrong most (docs/countdown.md) is on the winning path of few searches."""
    rng = random.Random(seed)
    out = []
    for problem in problems.splits(count, 0, 0)["train"]:
        hard = oversample > 1 and traces.solution_kind(problem) in ("*", "/")  # a second search: only if asked
        for _ in range(oversample if hard else 1):
            cap = traces.sample_threads(rng)
            if fmt == "sequential":
                segments = traces.sequential(problem, cap)
            else:
                segments = traces.parallel(problem, cap, keep, rng)
            example = encode(tokenizer, segments, eos, root_weight, decision_weight, chain_weight)
            if len(example.ids) <= MAX_LEN:
                out.append(example)
    return out


def batches(data: list, batch_tokens: int, rng: random.Random):
    """Length-bucketed batches of about `batch_tokens` (padded) tokens, forever."""
    while True:
        order = sorted(range(len(data)), key=lambda i: (len(data[i].ids), rng.random()))
        groups, group, width = [], [], 0
        for i in order:
            width = max(width, len(data[i].ids))
            if group and width * (len(group) + 1) > batch_tokens:
                groups.append(group)
                group, width = [], len(data[i].ids)
            group.append(i)
        groups.append(group)
        rng.shuffle(groups)
        yield from groups


def collate(data: list[Example], group: list[int], pad: int, device: str) -> dict[str, torch.Tensor]:
    """Model inputs for a batch: ids, loss weights, tree masks [B, 1, L, L] and position ids, padded."""
    width = max(len(data[i].ids) for i in group)
    ids = torch.full((len(group), width), pad, dtype=torch.long)
    weights = torch.zeros((len(group), width))
    mask = torch.eye(width, dtype=torch.bool).repeat(len(group), 1, 1, 1)  # padding sees itself only
    positions = torch.zeros((len(group), width), dtype=torch.long)
    for row, i in enumerate(group):
        example = data[i]
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        weights[row, :n] = torch.tensor(example.loss)
        mask[row, 0, :n, :n], positions[row, :n] = tree_mask(example)
    return {"input_ids": ids.to(device), "weights": weights.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device)}  # fmt: skip


def weighted_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of token t+1 given tokens up to t, weighted per token. Predicting the next
    token in sequence order is right for every trained token: a generated segment always
    comes right after its parent segment (traces.parallel)."""
    logits = (
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        .logits[:, :-1]
        .float()
    )  # [B, L-1, vocab]; fp32 for the loss under bf16 autocast
    targets, weights = batch["input_ids"][:, 1:], batch["weights"][:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    losses = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="none")
    return (losses * weights.reshape(-1)).sum() / weights.sum()


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
    parser.add_argument("--problems", type=int, default=problems.TRAIN_PROBLEMS, help="training problems")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--minutes", type=float, default=0, help="stop after this much training time (0: no limit)")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", choices=["tiny", "small"], default="small")
    parser.add_argument("--root-weight", type=float, default=4.0, help="loss weight of the root thread's tokens")
    parser.add_argument("--decision-weight", type=float, default=10.0, help="loss weight of a try's verdict token")
    parser.add_argument("--chain-weight", type=float, default=1.0, help="loss weight of a line carrying a chain")
    parser.add_argument("--oversample", type=int, default=1, help="copies of a problem whose solution needs * or /")
    parser.add_argument("--keep", type=int, default=2, help="children packed per fork (0: all; parallel only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (a new schedule)")
    parser.add_argument("--save-every", type=int, default=250)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build()
    eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)

    started = time.time()
    data = examples(args.format, args.problems, args.seed, tokenizer, eos, args.root_weight, args.keep,
                    args.decision_weight, args.chain_weight, args.oversample)  # fmt: skip
    tokens = sum(len(example.ids) for example in data)
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

    budget = args.minutes * 60

    def progress_at(s: int, seconds: float) -> float:
        """How far through training: by steps, or by the time budget when that comes first."""
        return max(s / args.steps, seconds / budget if budget else 0.0)

    def lr_at(done: float) -> float:
        warmup = 0.05
        if done < warmup:
            return args.lr * (done + 1 / args.steps) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (done - warmup) / (1 - warmup))))

    model.train()
    progress = tqdm(total=args.steps, initial=step, desc=f"train {args.format} ({params / 1e6:.1f}M params)")
    window: list[float] = []
    run_start = time.time()
    while progress_at(step, elapsed + time.time() - run_start) < 1:
        batch = collate(data, next(batch_iter), pad, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress_at(step, elapsed + time.time() - run_start))
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):  # CUDA: bf16 matmuls
            loss = weighted_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        seen_tokens += batch["input_ids"].numel()
        window.append(loss.item())
        finished = progress_at(step, elapsed + time.time() - run_start) >= 1
        if step % 25 == 0 or finished:
            losses.append((step, sum(window) / len(window)))
            window = []
            progress.set_postfix(loss=f"{losses[-1][1]:.3f}")
        progress.update(1)
        if step % args.save_every == 0 or finished:
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
                "root_weight": args.root_weight,
                "keep": args.keep,
                "decision_weight": args.decision_weight,
                "chain_weight": args.chain_weight,
                "oversample": args.oversample,
            }
            (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    progress.close()


if __name__ == "__main__":
    main()
