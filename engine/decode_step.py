"""The CPU's fused decode step: `engine/csrc/decode_step.cpp`, compiled on first use.

At the embedded model's size a decode step in PyTorch is about a hundred small ops, and
their dispatch, not their arithmetic, is most of its time (bench/engine.py). The C++
step runs a whole decode-only step in one call: the matmuls stay ATen's, the rest are
plain loops. It is built once per machine with `torch.utils.cpp_extension` (g++ and
ninja; cached in TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); where it
cannot be built the engine logs why and runs every step in PyTorch.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from types import ModuleType

from torch.utils import cpp_extension

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "decode_step.cpp"
# OpenMP: ATen's parallel_for inlines `omp parallel`. -ffast-math lets the loops reorder sums
# and call glibc's vector expf (logits stay within the tests' 1e-4 of transformers); it is
# not passed to the linker, which would set flush-to-zero for the whole process.
CFLAGS = ["-O3", "-fopenmp", "-ffast-math"]


@cache
def extension() -> ModuleType | None:
    """The compiled module, or None (logged) when it cannot be built here."""
    try:
        return cpp_extension.load("braid_decode_step", [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler, no ninja, ...: the PyTorch path still runs
        log.warning("fused decode step unavailable, decoding in PyTorch: %s: %s", type(err).__name__, err)
        return None
