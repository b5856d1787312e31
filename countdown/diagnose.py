"""Where a Countdown checkpoint goes wrong: each step of the search, teacher-forced.

    python -m countdown.diagnose --model countdown/model --limit 100

Every thread of the traces' search (the test split) is given its exact context, and the
model's greedy choice is checked at every token it would write: a step is right when all
of its tokens are. Steps are grouped by kind (the root's fork and answer, a child's fork
and conclusion, a leaf's tries), so a low accuracy points at the step to fix; an end to
end evaluation (`countdown.evaluate`) only says that some step failed. The leaf's
decision after each try is also counted apart: "leaf hit" (the result is the target: is
" found" chosen?) and "leaf miss" (it is not: is a new line chosen?), and so is every
result the model computes, by where it stands, operator and size ("outline * 3d": the
result of a product of 3 digits in a fork's outline, which becomes a thread's numbers;
"try - 2d": a leaf's difference of 1 or 2 digits, which it compares with the target).
Parallel checkpoints only. Prints a table, and last a line of JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from itertools import accumulate
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from countdown import problems, traces
from countdown.evaluate import DEFAULT_MODEL
from countdown.tokenizer import EOS, build
from countdown.train import encode, tree_mask, verdicts

KINDS = ("root", "child", "leaf")  # by depth
RESULT = re.compile(r"\d+([+\-*/])\d+=(\d+)")  # `52-12=40`: the operator, the result


def step_kind(segments: list[traces.Segment], index: int, depth: dict[int, int]) -> str:
    seg = segments[index]
    role = "fork" if seg.text.startswith("<Parallel>") else "chain" if "," in seg.text else "end"
    return f"{KINDS[depth[seg.thread]]} {role}"


def tally(row: list[int], right: list[bool]) -> None:
    """Count one step into `row` (steps, right steps, tokens, right tokens)."""
    row[0] += 1
    row[1] += all(right)
    row[2] += len(right)
    row[3] += sum(right)


def results(text: str) -> list[tuple[int, int, str]]:
    """Where each computed result stands in a segment's text, by characters: (start, end, kind),
    e.g. `outline * 3d`. A conclusion with a chain (a comma, as in `step_kind`) copies its
    results: left out."""
    if "," in text:
        return []
    where = "outline" if text.startswith("<Parallel>") else "try"
    return [
        (m.start(2), m.end(2), f"{where} {m.group(1)} {'3d' if len(m.group(2)) >= 3 else '2d'}")
        for m in RESULT.finditer(text)
    ]


def diagnose(model: LlamaForCausalLM, search_problems: list[problems.Problem]) -> dict[str, dict[str, float]]:
    """Per kind of step: how many there were, the share exactly right, the share of right tokens."""
    tokenizer = build()
    eos = tokenizer.token_to_id(EOS)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # steps, right steps, tokens, right tokens
    for problem in search_problems:
        segments = traces.parallel(problem)
        example = encode(tokenizer, segments, eos)
        mask, positions = tree_mask(example)
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([example.ids]), attention_mask=mask[None, None], position_ids=positions[None]
            ).logits[0]  # [L, vocab]
        predicted = logits.argmax(-1).tolist()
        depth = {0: 0}
        for seg in segments:
            if seg.parent is not None and seg.thread not in depth:
                depth[seg.thread] = depth[segments[seg.parent].thread] + 1
        tokens_of: dict[int, list[int]] = defaultdict(list)
        for at, index in enumerate(example.segment):
            tokens_of[index].append(at)
        for index, seg in enumerate(segments):
            if not seg.generated:
                continue
            own = tokens_of[index]
            before = [tokens_of[seg.parent][-1], *own[:-1]]  # the position that predicts each token
            right = [predicted[b] == example.ids[t] for b, t in zip(before, own, strict=True)]
            kind = step_kind(segments, index, depth)
            tally(counts[kind], right)
            if kind == "leaf end":  # the verdict after each try: " found" or a new line
                ids = [example.ids[t] for t in own]
                for t, ok, verdict in zip(ids, right, verdicts(tokenizer, ids), strict=True):
                    if verdict:
                        tally(counts["leaf hit" if tokenizer.id_to_token(t) == " " else "leaf miss"], [ok])
            starts = list(accumulate((len(tokenizer.id_to_token(example.ids[t])) for t in own), initial=0))
            for begin, end, result_kind in results(seg.text):  # one character per digit token
                tally(counts[result_kind], [r for r, at in zip(right, starts[:-1], strict=True) if begin <= at < end])
    return {
        kind: {"steps": n, "exact": good / n, "token_accuracy": good_tokens / tokens}
        for kind, (n, good, tokens, good_tokens) in sorted(counts.items())
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint folder (parallel format)")
    parser.add_argument("--limit", type=int, default=100, help="first N test problems")
    args = parser.parse_args(argv)
    model = LlamaForCausalLM.from_pretrained(args.model).eval()
    result = diagnose(model, problems.splits(0, 0, args.limit)["test"])
    print(f"{'step':<13} {'count':>6} {'exact':>7} {'tokens':>7}")
    for kind, row in result.items():
        print(f"{kind:<13} {row['steps']:>6} {row['exact']:>7.1%} {row['token_accuracy']:>7.1%}")
    print(json.dumps({"model": str(args.model), "problems": args.limit, "steps": result}))


if __name__ == "__main__":
    main()
