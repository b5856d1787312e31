"""The thread timeline (`braid trace`): for a request of every protocol, a valid PNG and a
self-contained HTML page with one bar per thread, the critical path marked, fork and join
marks; and the command line on an HTTP-shaped answer."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

from cluster.timeline import critical_threads, main, render_html, render_png
from engine.forkjoin import ForkJoinEngine
from engine.sampling import SamplingParams
from engine.threads import ForkJoinOptions
from tests.scripted import make_protocol_checkpoint, scripted_engine
from tests.test_forkjoin import APR_SCRIPTS, MV_SCRIPTS, TW_ROOT

NESTED_TW = {
    "Q:": TW_ROOT + "answer",
    "<Thread>\n1:1: a\n": "<Parallel><Outlines><Outline>x</Outline><Outline>y</Outline></Outlines>one</Thread>",
    "<Thread>\n2:2: b\n": "two two two two two</Thread>",
    "<Thread>\n1:x\n": "deep deep deep deep deep deep</Thread>",
    "<Thread>\n2:y\n": "short</Thread>",
}
SCRIPTS = {"multiverse": MV_SCRIPTS, "threadweaver": NESTED_TW, "apr": APR_SCRIPTS}


class Shapes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.classes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("rect", "polygon"):
            self.classes.append(dict(attrs).get("class") or "")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_protocol_checkpoint(tmp_path_factory.mktemp("timeline"))


@pytest.mark.parametrize("protocol", sorted(SCRIPTS))
def test_every_protocol_renders_one_bar_per_thread(ckpt: Path, tmp_path: Path, protocol: str) -> None:
    engine, _ = scripted_engine(ckpt, SCRIPTS[protocol])
    (result,) = ForkJoinEngine(engine).run(["Q:"], ForkJoinOptions(protocol=protocol, sampling=SamplingParams()))
    doc = {**result.to_dict(), "replica": 0, "latency_s": max(t.end_s or 0.0 for t in result.threads)}
    render_png(doc, tmp_path / "t.png")
    render_html(doc, tmp_path / "t.html")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(tmp_path / "t.png").shape
    assert height > 100 and width > 500
    page = (tmp_path / "t.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page.split("<svg")[1][30:]
    shapes = Shapes()
    shapes.feed(page)
    bars = [c for c in shapes.classes if c.startswith("thread")]
    assert len(bars) == len(result.threads) > 1
    assert shapes.classes.count("fork") == shapes.classes.count("join") >= 1
    critical = critical_threads({t.thread_id: t for t in result.threads}, result.threads[0].thread_id)
    assert bars.count("thread critical") == len(critical)
    # The critical path's tokens are the request's own count of them.
    assert sum(t.generated_tokens for t in result.threads if t.thread_id in critical) == (
        result.usage.critical_path_tokens
    )


def test_braid_trace_reads_an_http_answer(ckpt: Path, tmp_path: Path) -> None:
    engine, _ = scripted_engine(ckpt, NESTED_TW)
    (result,) = ForkJoinEngine(engine).run(["Q:"], ForkJoinOptions(protocol="threadweaver"))
    answer = {"choices": [{"text": result.text}], "braid": {**result.to_dict(), "replica": 1, "latency_s": 0.5}}
    (tmp_path / "answer.json").write_text(json.dumps(answer))
    main([str(tmp_path / "answer.json"), "-o", str(tmp_path / "trace")])
    assert (tmp_path / "trace.png").exists() and "r1  t" in (tmp_path / "trace.html").read_text()
