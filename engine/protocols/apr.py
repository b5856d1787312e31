"""APR (Pan et al. 2025, "Learning Adaptive Parallel Reasoning"): the parent spawns
sub-searches, each child starts from a short fresh prompt (its spawn line), and only the
children's results are appended to the parent.

    <Calling Sub Searches>
    <Start Sub Search 0 at level 1> Moving to Node #1,0 ...     <- spawn line of child 0
    <Start Sub Search 1 at level 1> Moving to Node #1,1 ...
    <End Calling Sub Searches>                                 <- fork
      child: "Moving to Node #1,0 ..." ... <Goal Reached> 24+4=28 ...   (ends at that line's end)
    <Sub Searches>                                             <- appended at the join
    <Goal Reached in Sub Search 0 at level 1> 24+4=28 ...
    <No Solution in Sub Search 1 at level 1>
    <End Sub Searches>
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from engine.protocols.base import ChildResult, EndEvent, Event, ForkEvent, Parser, Protocol

SPAWN = re.compile(r"<Start Sub Search (\d+) at level (\d+)>")
GOAL, NO_SOLUTION = "<Goal Reached>", "<No Solution>"


@dataclass(slots=True)
class AprParser(Parser):
    calling: bool = False
    spawn: list[str] | None = None  # the spawn line being read
    spawns: list[str] = field(default_factory=list)
    result_seen: bool = False  # a child wrote its result tag; it ends at that line's end

    def on_tag(self, tag: str) -> Event | None:
        if tag == "<Calling Sub Searches>":
            self.calling, self.spawns, self.spawn = True, [], None
        elif self.calling and SPAWN.fullmatch(tag):
            self._close_spawn()
            self.spawn = []
        elif tag == "<End Calling Sub Searches>" and self.calling:
            self._close_spawn()
            self.calling = False
            return ForkEvent(self.spawns)
        elif tag in (GOAL, NO_SOLUTION) and self.is_child:
            self.result_seen = True
        return None

    def on_text(self, text: str) -> Event | None:
        if self.spawn is not None:
            line, newline, _ = text.partition("\n")
            self.spawn.append(line)
            if newline:
                self._close_spawn()
        if self.result_seen and "\n" in text:
            self.result_seen = False  # the thread ends once, at its result line's end
            return EndEvent()
        return None

    def _close_spawn(self) -> None:
        if self.spawn is not None:
            self.spawns.append("".join(self.spawn).strip())
            self.spawn = None


class Apr(Protocol):
    name = "apr"
    continues_context = False
    merges_kv = False

    def parser(self, is_child: bool) -> Parser:
        return AprParser(is_child)

    def child_prompt(self, spawn: str, index: int, depth: int) -> str:
        return spawn + "\n"

    def closing(self) -> str:
        return ""

    def succeeded(self, text: str) -> bool:
        return GOAL in text

    def join_text(self, results: list[ChildResult], depth: int) -> str:
        lines = []
        for r in results:
            where = f"in Sub Search {r.index} at level {depth + 1}"
            if r.succeeded:
                found = r.text.split(GOAL, 1)[1].split("\n", 1)[0].strip() if GOAL in r.text else ""
                lines.append(f"<Goal Reached {where}> {found}".rstrip())
            else:
                lines.append(f"<No Solution {where}>")
        return "<Sub Searches>\n" + "\n".join(lines) + "\n<End Sub Searches>\n"
