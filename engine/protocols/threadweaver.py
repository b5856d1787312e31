"""ThreadWeaver (Lian et al. 2025): threads continue the parent's context; the join
appends the threads in order to the parent, which prefills them.

    <Parallel>
    <Outlines>
    <Outline>1: ...</Outline>
    <Outline>2: ...</Outline>
    </Outlines>                  <- fork: one child per outline
    <Thread>\\n1:... </Thread>     <- child 1 (continues the context above)
    <Thread>\\n2:... </Thread>     <- appended to the parent at the join, then
    </Parallel>                  <- inserted, and the parent goes on

A thread's header repeats its outline (`<Thread>\\n1:{outline}\\n`), as APR's children
start from their spawn line: a child reads its task right before it, instead of having
to find the i-th outline further back in its context.
"""

from __future__ import annotations

from engine.protocols.base import ChildResult, Parser, Protocol
from engine.protocols.multiverse import OutlineParser


class ThreadWeaver(Protocol):
    name = "threadweaver"
    continues_context = True
    merges_kv = False

    def parser(self, is_child: bool) -> Parser:
        return OutlineParser(
            is_child, open_tag="<Outlines>", close_tag="</Outlines>", child_open="<Thread>", child_close="</Thread>"
        )

    def child_prompt(self, spawn: str, index: int, depth: int) -> str:
        return f"<Thread>\n{index + 1}:{spawn}\n"

    def closing(self) -> str:
        return "</Thread>"

    def join_text(self, results: list[ChildResult], depth: int) -> str:
        joined = [r for r in results if r.status in ("done", "truncated")]
        threads = "".join(f"\n{self.child_prompt(r.spawn, r.index, depth)}{r.text}" for r in joined)
        return f"{threads}\n</Parallel>\n"
