"""Multiverse (Yang et al. 2025): paths continue the parent's context; the join
concatenates their KV after the shared prefix, with no recompute.

    <Parallel>
    <Goal>
    <Outline>1: ...</Outline>
    <Outline>2: ...</Outline>
    </Goal>                      <- fork: one child per outline
    <Path>\\n1: ... </Path>        <- child 1 (continues the context above)
    <Path>\\n2: ... </Path>        <- child 2
    <Conclusion> ...             <- inserted at the join; positions after the longest path
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.protocols.base import ChildResult, EndEvent, Event, ForkEvent, Parser, Protocol


@dataclass(slots=True)
class OutlineParser(Parser):
    """Collects `<Outline>`s inside an opening block and forks at its close; a child ends
    at the close tag of its own block. Shared by Multiverse and ThreadWeaver."""

    open_tag: str = "<Goal>"
    close_tag: str = "</Goal>"
    child_open: str = "<Path>"
    child_close: str = "</Path>"
    collecting: bool = False
    outline: list[str] | None = None
    outlines: list[str] = field(default_factory=list)
    open_blocks: int = 0  # child blocks the thread opened itself (not forked): they do not end it

    def on_tag(self, tag: str) -> Event | None:
        if tag == self.open_tag:
            self.collecting, self.outlines, self.outline = True, [], None
        elif tag == "<Outline>" and self.collecting:
            self.outline = []
        elif tag == "</Outline>" and self.outline is not None:
            self.outlines.append("".join(self.outline).strip())
            self.outline = None
        elif tag == self.close_tag and self.collecting:
            self.collecting = False
            return ForkEvent(self.outlines)
        elif tag == self.child_open:
            self.open_blocks += 1
        elif tag == self.child_close:
            if self.open_blocks:
                self.open_blocks -= 1
            elif self.is_child:
                return EndEvent()
        return None

    def on_text(self, text: str) -> Event | None:
        if self.outline is not None:
            self.outline.append(text)
        return None


class Multiverse(Protocol):
    name = "multiverse"
    continues_context = True
    merges_kv = True

    def parser(self, is_child: bool) -> Parser:
        return OutlineParser(is_child)

    def child_prompt(self, spawn: str, index: int, depth: int) -> str:
        return f"<Path>\n{index + 1}:"

    def closing(self) -> str:
        return "</Path>"

    def join_text(self, results: list[ChildResult], depth: int) -> str:
        return "<Conclusion>"
