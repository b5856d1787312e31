"""Protocol parsers under arbitrary text: lossless scanning, tags split anywhere, no surprises."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.protocols import PROTOCOLS, EndEvent, ForkEvent, TagScanner

PIECES = [
    "<Parallel>", "</Parallel>", "<Goal>", "</Goal>", "<Outline>", "</Outline>", "<Path>", "</Path>",
    "<Outlines>", "</Outlines>", "<Thread>", "</Thread>", "<Calling Sub Searches>", "<End Calling Sub Searches>",
    "<Start Sub Search 0 at level 1>", "<Goal Reached>", "<No Solution>", "<", ">", "\n", "a", "12+3=15", " ",
]  # fmt: skip
streams = st.lists(st.sampled_from(PIECES), max_size=60).map("".join)


def chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(text=streams, cuts=st.lists(st.integers(0, 400), max_size=30))
def test_scanner_is_lossless_however_the_text_is_cut(text: str, cuts: list[int]) -> None:
    scanner = TagScanner()
    items = [item for piece in chunks(text, cuts) for item in scanner.feed(piece)]
    assert "".join(value for _, value in items) + scanner.pending == text
    whole = TagScanner().feed(text)
    assert [v for k, v in items if k == "tag"] == [v for k, v in whole if k == "tag"]


@settings(max_examples=300, deadline=None)
@given(text=streams, cuts=st.lists(st.integers(0, 400), max_size=30), is_child=st.booleans())
def test_parsers_raise_the_same_events_however_the_text_is_cut(text: str, cuts: list[int], is_child: bool) -> None:
    for protocol in PROTOCOLS.values():
        whole = protocol.parser(is_child).feed(text)
        parser = protocol.parser(is_child)
        pieces = [e for piece in chunks(text, cuts) for e in parser.feed(piece)]
        assert pieces == whole
        for event in whole:
            assert isinstance(event, ForkEvent | EndEvent)
            assert not isinstance(event, EndEvent) or is_child  # a root never ends by protocol
