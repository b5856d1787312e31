"""`make gpu-check`: Braid on a CUDA GPU in one command, under 8 minutes.

Runs the engine and fork-join tests with every engine on the GPU (`pytest --device cuda`),
the GPU-only tests (tests/test_gpu.py: bf16 logits against transformers, a fork and a
Multiverse merge, sampling at temperature > 0, loading without a second weight copy), then
`bench.engine --device cuda --dtype bfloat16` against transformers' generate(). Ends with one
line of JSON. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import torch

TESTS = ["tests/test_engine.py", "tests/test_forkjoin.py", "tests/test_gpu.py"]
TESTS_TIMEOUT_S = 240
BENCH_TIMEOUT_S = 200


def run(command: list[str], timeout_s: float) -> tuple[int, str]:
    """Exit status and standard output (printed once it ends, with the end of its errors); 124
    when it ran past `timeout_s`."""
    print("$", " ".join(command), flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or b""  # bytes here even with text=True
        out = out if isinstance(out, str) else out.decode()
        print(out)
        return 124, out
    print(done.stdout[-6000:], done.stderr[-3000:], sep="\n")
    return done.returncode, done.stdout


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"check": "gpu", "gpu": None, "skipped": "no CUDA device (torch.cuda)"}))
        return
    start = time.perf_counter()
    gpu = torch.cuda.get_device_name(0)
    status, out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cuda", *TESTS],
                      TESTS_TIMEOUT_S)  # fmt: skip
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", out)}
    status_bench, out_bench = run([sys.executable, "-m", "bench.engine", "--device", "cuda", "--dtype", "bfloat16"],
                                  BENCH_TIMEOUT_S)  # fmt: skip
    lines = [line for line in out_bench.splitlines() if line.startswith("{")]
    engine = json.loads(lines[-1]) if status_bench == 0 and lines else None
    ok = status == 0 and engine is not None
    print(json.dumps({"check": "gpu", "gpu": gpu, "ok": ok, "tests": counts, "tests_status": status,
                      "engine": engine, "seconds": round(time.perf_counter() - start, 1)}))  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
