"""Shared fixtures; `--device cuda` (what `make gpu-check` passes) runs every engine the tests
build on that device instead of the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.model_runner import ModelRunner
from tests.checkpoints import make_checkpoint

ARCHS = ("llama", "qwen2", "qwen3")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="where the tests' engines run (cpu, cuda)")


@pytest.fixture(autouse=True)
def _engine_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    device = request.config.getoption("--device")
    if device == "cpu":
        return
    build = ModelRunner.__init__

    def on_device(self: ModelRunner, model_path: Any, _device: str = "cpu", *args: Any, **kwargs: Any) -> None:
        kwargs.pop("device", None)
        build(self, model_path, device, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "__init__", on_device)


@pytest.fixture(scope="session", params=ARCHS)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint folder of each supported architecture."""
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
