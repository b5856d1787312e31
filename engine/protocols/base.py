"""What a parallel-reasoning format is to Braid: an incremental parser over a thread's
text that raises fork and end-of-thread events, plus how children start and how a join
is written back into the parent.

Tags are `<...>` spans, whether the tokenizer has them as special tokens or spells them
out byte by byte: the scanner sees the same text either way, and a tag split across
tokens is held until it completes. Each fed delta is scanned once; nothing is re-read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

MAX_TAG_CHARS = 80  # a '<' followed by more than this without '>' is plain text


@dataclass(slots=True, frozen=True)
class ForkEvent:
    spawns: list[str]  # one entry per child, in order: its outline / spawn line


@dataclass(slots=True, frozen=True)
class EndEvent:
    """The thread closed its own block: it is done (its result is its text)."""


Event = ForkEvent | EndEvent


class TagScanner:
    """Splits a text stream into ("text", str) and ("tag", "<...>") items, incrementally."""

    def __init__(self) -> None:
        self.pending = ""  # an unfinished "<..." held back

    def feed(self, text: str) -> list[tuple[str, str]]:
        items: list[tuple[str, str]] = []
        text = self.pending + text
        self.pending = ""
        while text:
            start = text.find("<")
            if start < 0:
                items.append(("text", text))
                break
            if start:
                items.append(("text", text[:start]))
            end = text.find(">", start + 1)
            nested = text.find("<", start + 1)
            if end < 0 and nested < 0:
                if len(text) - start > MAX_TAG_CHARS:
                    items.append(("text", text[start:]))
                else:
                    self.pending = text[start:]
                break
            if end < 0 or 0 <= nested < end:  # "<" that opens no tag: plain text
                items.append(("text", text[start:nested]))
                text = text[nested:]
                continue
            items.append(("tag", text[start : end + 1]))
            text = text[end + 1 :]
        return _merge_text(items)


def _merge_text(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for kind, value in items:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + value)
        else:
            out.append((kind, value))
    return out


@dataclass(slots=True)
class Parser(ABC):
    """Per-thread protocol state; `is_child` threads end when they close their block."""

    is_child: bool
    scanner: TagScanner = field(default_factory=TagScanner)

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        for kind, value in self.scanner.feed(text):
            event = self.on_tag(value) if kind == "tag" else self.on_text(value)
            if event is not None:
                events.append(event)
        return events

    @abstractmethod
    def on_tag(self, tag: str) -> Event | None: ...

    @abstractmethod
    def on_text(self, text: str) -> Event | None: ...


@dataclass(slots=True, frozen=True)
class ChildResult:
    index: int  # the child's place in its fork, from 0
    spawn: str  # the outline or spawn line it was started for
    text: str  # what the child generated
    succeeded: bool  # by the protocol's own marker or the verifier
    status: str  # "done", "truncated", "rejected"


class Protocol(ABC):
    """One parallel-reasoning format."""

    name: str
    # True: children continue the parent's context (KV shared by fork).
    # False: each child starts from a fresh prompt built from its spawn line (APR).
    continues_context: bool = True
    # True: the join concatenates the children's KV into the parent (Multiverse).
    merges_kv: bool = False

    @abstractmethod
    def parser(self, is_child: bool) -> Parser: ...

    @abstractmethod
    def child_prompt(self, spawn: str, index: int, depth: int) -> str:
        """Text a child starts with: appended to the parent's context, or the whole
        prompt when the protocol does not continue the context."""

    @abstractmethod
    def closing(self) -> str:
        """Text that closes a child's block when the child was cut short."""

    @abstractmethod
    def join_text(self, results: list[ChildResult], depth: int) -> str:
        """Text the parent prefills at the join (after a merge, for `merges_kv`)."""

    def succeeded(self, text: str) -> bool:
        """Whether a child's own text claims success; formats without a marker say yes."""
        return True

    def answer(self, text: str) -> str:
        """What a child concluded, for the `vote` policy: its last non-empty line."""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""
