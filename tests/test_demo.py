"""`braid demo` end to end, as a user runs it: a local cluster, live trees, checked answers,
timelines written, the summary printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_the_demo_solves_its_known_problems_and_writes_timelines(tmp_path: Path) -> None:
    env = {**os.environ, "COLUMNS": "120"}  # Ray's token auth as it comes: on
    command = [sys.executable, "-m", "cluster.demo", "--problems", "3", "--replicas", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("✓ correct") >= 2  # the two known problems
    assert "Summary" in done.stdout and "root" in done.stdout
    for i in range(3):
        assert (tmp_path / f"request-{i}.png").stat().st_size > 1000
        assert "<svg" in (tmp_path / f"request-{i}.html").read_text()
