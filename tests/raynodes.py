"""Ray nodes started by a test as a user would (`ray start`), and stopped with everything
they started: only these, never a cluster running beside the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # token auth off on purpose, as a user might


@contextlib.contextmanager
def ray_node(*options: str, prefix: tuple[str, ...] = (), wait_for: tuple[str, int] | None = None) -> Iterator[None]:
    """`ray start --block OPTIONS` (after `prefix`, e.g. `ip netns exec NS`), in a session of its
    own, killed with its whole process group at the end; `wait_for`: (host, port) it listens on
    once up (a head's GCS)."""
    temp = tempfile.mkdtemp(prefix="braid-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = ("--include-dashboard=false",) if "--head" in options else ()  # (an option of heads only)
    command = [*prefix, sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--temp-dir={temp}",
               *head, *options]  # fmt: skip
    node = subprocess.Popen(
        command, env=RAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        end = time.monotonic() + 60
        while wait_for is not None and not listening(*wait_for):
            assert time.monotonic() < end and node.poll() is None, f"ray start {' '.join(options)} did not come up"
            time.sleep(0.5)
        yield
    finally:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0
