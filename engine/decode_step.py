"""The CPU's fused decode step: `engine/csrc/decode_step.cpp`, compiled on first use.

At the embedded model's size a decode step in PyTorch is about a hundred small ops, and
their dispatch, not their arithmetic, is most of its time (bench/engine.py). The C++
step runs a whole decode-only step (every sequence computes one token) in one call, over
the same fused weights as `engine.model` and the same decode groups as
`engine.attention`. It is built once per machine with `torch.utils.cpp_extension` (g++
and ninja; cached in TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); where it
cannot be built the engine logs why and runs every step in PyTorch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils import cpp_extension

from cache_service import Sequence
from engine.attention import share_groups
from engine.model import CausalLM, LayerWeights

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "decode_step.cpp"
# OpenMP: ATen's parallel_for inlines `omp parallel`. -ffast-math lets the loops reorder sums
# and call glibc's vector expf (logits stay within the tests' 1e-4 of transformers); it is
# not passed to the linker, which would set flush-to-zero for the whole process.
CFLAGS = ["-O3", "-fopenmp", "-ffast-math"]
NAME = "braid_decode_step"
# A build takes under a minute (20 s on one core here). A build lock this old was left by a
# process killed while it built, and torch would wait on it for good: every replica start would hang.
STALE_LOCK_S = 600


def build_lock() -> Path:
    """The lock torch's `cpp_extension` holds while it builds this extension."""
    return Path(cpp_extension._get_build_directory(NAME, verbose=False)) / "lock"


@cache
def extension() -> ModuleType | None:
    """The compiled module, or None (logged) when it cannot be built here."""
    try:
        lock = build_lock()
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing %s, a build lock left by a process killed while it built", lock)
            lock.unlink(missing_ok=True)
        return cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler, no ninja, ...: the PyTorch path still runs
        log.warning("fused decode step unavailable, decoding in PyTorch: %s: %s", type(err).__name__, err)
        return None


def build(model: CausalLM) -> Any | None:
    """The C++ step over `model`'s weights; None off the CPU, below fp32, or without a build."""
    if model.embed.device.type != "cpu" or model.embed.dtype != torch.float32:
        return None
    module = extension()
    if module is None:
        return None
    args = model.args
    return module.DecodeStep(
        [[getattr(w, f.name) for f in fields(LayerWeights)] for w in model.layers],
        model.embed,
        model.norm,
        model.lm_head,
        model.inv_freq,
        model.rope_scale,
        args.rms_norm_eps,
        args.num_heads,
        args.num_kv_heads,
        args.head_dim,
    )


def decode_groups(seqs: list[Sequence], block_size: int) -> list[Any]:
    """The step's sequences (one new token each, row i = seqs[i]) as the C++ step's groups:
    rows, the slots of a shared cascade prefix (empty: none), each member's own slots."""
    group = extension().Group
    return [
        group(
            [row for row, _ in members],
            members[0][1].slots[:prefix],
            [seq.slots[prefix : seq.num_computed + 1] for _, seq in members],
        )
        for members, prefix in share_groups(list(enumerate(seqs)), block_size)
    ]
