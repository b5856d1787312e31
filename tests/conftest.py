from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint

ARCHS = ("llama", "qwen2", "qwen3")


@pytest.fixture(scope="session", params=ARCHS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint folder of each supported architecture."""
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
