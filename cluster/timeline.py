"""A request's thread tree as a timeline: one row per thread, grouped by the replica it ran
on, a bar from its start to its end coloured by how it ended, a mark where its parent forked
it and one where the fork joined, the critical path outlined, tokens per thread. As a PNG
(matplotlib) and as a self-contained HTML page (inline SVG, no scripts).

    braid trace answer.json -o trace          # writes trace.png and trace.html

The input is what Braid answers: an HTTP response (its `braid` object), a `Replica.generate`
result or a batch-job row's result — anything with `threads` (and `replica`, `latency_s`).
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass
from pathlib import Path

from engine.threads import ThreadNode, critical_path

STATUS_COLOURS = {
    "joined": "#2e8b57", "done": "#4682b4", "truncated": "#e8a33d", "pruned": "#a9a9a9", "rejected": "#c0392b",
    "failed": "#8b0000", "cancelled": "#a9a9a9", "dropped": "#d3d3d3", "running": "#6a5acd", "waiting": "#d3d3d3",
}  # fmt: skip


@dataclass(slots=True, frozen=True)
class Row:
    thread_id: int
    parent_id: int | None
    replica: int
    depth: int
    start_s: float
    end_s: float
    tokens: int
    status: str
    spawn: str
    critical: bool  # on the critical path: the longest chain of tokens that had to come one after another


@dataclass(slots=True, frozen=True)
class Mark:
    thread_id: int  # the parent's row
    at_s: float
    kind: str  # "fork" or "join"


def braid_object(doc: dict) -> dict:
    """The part of an answer that carries the thread tree."""
    return doc.get("braid", doc)


def critical_threads(nodes: dict[int, ThreadNode], thread_id: int) -> set[int]:
    """The threads on the critical path below `thread_id`: it, and for each of its forks the
    child with the longest critical path (`engine.threads.critical_path`)."""
    best: dict[int, int] = {}  # fork -> its child with the longest critical path
    for child in nodes[thread_id].children:
        fork = nodes[child].fork
        if fork not in best or critical_path(nodes, child) > critical_path(nodes, best[fork]):
            best[fork] = child
    return {thread_id}.union(*(critical_threads(nodes, child) for child in best.values()))


def layout(doc: dict) -> tuple[list[Row], list[Mark], float]:
    """Rows (grouped by replica, each subtree in depth-first order), fork and join marks, and the end time."""
    data = braid_object(doc)
    nodes = {t["thread_id"]: ThreadNode(**t) for t in data["threads"]}
    root = next(n for n in nodes.values() if n.parent_id is None)
    end = float(data.get("latency_s") or max((n.end_s or 0.0) for n in nodes.values()) or 1.0)
    critical = critical_threads(nodes, root.thread_id)
    rows: list[Row] = []

    def visit(node: ThreadNode, replica: int) -> None:
        replica = node.replica if node.replica is not None else replica
        rows.append(Row(node.thread_id, node.parent_id, replica, node.depth, node.start_s,
                        node.end_s if node.end_s is not None else end, node.generated_tokens, node.status,
                        node.spawn, node.thread_id in critical))  # fmt: skip
        for child in node.children:
            visit(nodes[child], replica)

    home = int(data.get("replica") or 0)
    visit(root, home)
    rows.sort(key=lambda r: (r.replica != home, r.replica))  # the root's replica first; stable: tree order kept
    forks: dict[tuple[int, int], list[Row]] = {}
    for r in rows:
        if r.parent_id is not None:
            forks.setdefault((r.parent_id, nodes[r.thread_id].fork), []).append(r)
    marks: list[Mark] = []
    for (parent, _), children in forks.items():
        marks.append(Mark(parent, min(c.start_s for c in children), "fork"))
        marks.append(Mark(parent, max(c.end_s for c in children), "join"))
    return rows, marks, end


def label(row: Row) -> str:
    return f"t{row.thread_id}  d{row.depth}  {row.tokens} tok"


def render_png(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, marks, end = layout(doc)
    y = {r.thread_id: i for i, r in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * len(rows)))
    for r in rows:
        ax.barh(y[r.thread_id], max(r.end_s - r.start_s, end / 400), left=r.start_s, height=0.6,
                color=STATUS_COLOURS.get(r.status, "#888888"), edgecolor="black" if r.critical else "none",
                linewidth=2 if r.critical else 0)  # fmt: skip
    for m in marks:
        ax.plot(m.at_s, y[m.thread_id], marker="v" if m.kind == "fork" else "^", color="black", markersize=7)
    for i in range(1, len(rows)):
        if rows[i].replica != rows[i - 1].replica:  # replica groups apart
            ax.axhline(i - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [f"r{r.replica}  {label(r)}" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, end * 1.02)
    ax.set_xlabel("seconds since the request started")
    used = sorted({r.status for r in rows})
    handles = [plt.Rectangle((0, 0), 1, 1, color=STATUS_COLOURS.get(s, "#888888")) for s in used]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", linewidth=2))
    ax.legend(handles, [*used, "critical path"], fontsize=7, loc="lower right")
    ax.set_title(f"{len(rows)} threads; fork ▼, join ▲", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_svg(doc: dict) -> str:
    return svg(*layout(doc))


def svg(rows: list[Row], marks: list[Mark], end: float, width: int = 900) -> str:
    left, row_h, top = 190, 22, 24
    scale = (width - left - 20) / end
    height = top + row_h * len(rows) + 30
    y = {r.thread_id: top + i * row_h for i, r in enumerate(rows)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">']  # fmt: skip
    for r in rows:
        x, w, fill = left + r.start_s * scale, max((r.end_s - r.start_s) * scale, 1.5), STATUS_COLOURS.get(r.status)
        stroke = ' stroke="black" stroke-width="2"' if r.critical else ""
        tip = html.escape(f"thread {r.thread_id} on replica {r.replica}: {r.status}, {r.tokens} tokens, "
                          f"{r.start_s:.3f}-{r.end_s:.3f} s; {r.spawn}")  # fmt: skip
        cls = "thread critical" if r.critical else "thread"
        parts.append(f'<text x="4" y="{y[r.thread_id] + 14}">r{r.replica}  {html.escape(label(r))}</text>')
        parts.append(f'<rect class="{cls}" x="{x:.1f}" y="{y[r.thread_id] + 4}" width="{w:.1f}" height="14" '
                     f'fill="{fill or "#888888"}"{stroke}><title>{tip}</title></rect>')  # fmt: skip
    for m in marks:
        x, my = left + m.at_s * scale, y[m.thread_id]
        tip, base = (my + 8, my) if m.kind == "fork" else (my + 14, my + 22)  # fork: points down; join: up
        parts.append(f'<polygon class="{m.kind}" points="{x - 5},{base} {x + 5},{base} {x},{tip}" fill="black"/>')
    parts.append(f'<text x="{left}" y="{height - 8}">0 s</text>')
    parts.append(f'<text x="{width - 60}" y="{height - 8}">{end:.2f} s</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(doc: dict, path: Path) -> None:
    rows, marks, end = layout(doc)
    legend = " ".join(f'<span style="background:{c};padding:0 6px;color:white">{s}</span>'
                      for s, c in STATUS_COLOURS.items() if any(r.status == s for r in rows))  # fmt: skip
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Braid request timeline</title></head><body>"
            f"<h3>{len(rows)} threads over {end:.2f} s</h3><p>{legend} <b>outlined</b>: critical path; "
            f"▼ fork, ▲ join; hover a bar for its thread.</p>{svg(rows, marks, end)}</body></html>")  # fmt: skip
    path.write_text(page)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="braid trace", description="A request's thread tree as a timeline.")
    parser.add_argument("answer", type=Path, help="a JSON answer of Braid (HTTP response or replica result)")
    parser.add_argument("-o", "--output", type=Path, default=Path("trace"), help="writes OUTPUT.png and OUTPUT.html")
    args = parser.parse_args(argv)
    doc = json.loads(args.answer.read_text())
    render_png(doc, args.output.with_suffix(".png"))
    render_html(doc, args.output.with_suffix(".html"))
    print(f"wrote {args.output.with_suffix('.png')} and {args.output.with_suffix('.html')}")


if __name__ == "__main__":
    main()
