"""The parallel-reasoning formats Braid speaks, by name."""

from engine.protocols.apr import Apr
from engine.protocols.base import ChildResult, EndEvent, ForkEvent, Parser, Protocol, TagScanner
from engine.protocols.multiverse import Multiverse
from engine.protocols.threadweaver import ThreadWeaver

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (Apr(), Multiverse(), ThreadWeaver())}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


__all__ = ["PROTOCOLS", "ChildResult", "EndEvent", "ForkEvent", "Parser", "Protocol", "TagScanner", "get_protocol"]
