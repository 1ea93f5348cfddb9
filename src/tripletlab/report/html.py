"""The self-contained HTML page of a report: sections of text, tables and embedded PNGs."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..utils import atomic_write_bytes, atomic_write_text

__all__ = ["ReportSection", "Table", "png_bytes", "render_html", "write_html"]


@dataclass
class Table:
    """A table of several columns: a caption, the column names, the rows (one value per
    column) and an optional note under it."""

    caption: str
    header: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    note: str = ""


@dataclass
class ReportSection:
    """One heading with optional text, tables and figures (name -> Figure). A table is
    ``(caption, [(name, value), ...])`` or a :class:`Table`."""

    title: str
    text: str = ""
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: list[tuple[str, list[tuple[str, Any]]] | Table] = field(default_factory=list)
    html_extra: str = ""


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    parts = [
        f"<table data-table='{html.escape(t.caption)}'><caption>{html.escape(t.caption)}"
        f"</caption><tr>{head}</tr>"
    ]
    for row in t.rows:
        parts.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>")
    parts.append("</table>")
    if t.note:
        parts.append(f"<p class='muted'>{html.escape(t.note)}</p>")
    return "".join(parts)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes, rendered with Agg here (no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches an Agg canvas to this figure only
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v, default=str))
    return html.escape(str(v))


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px} td,th{border:1px solid #ddd;padding:3px 8px;
font-size:13px;text-align:left} th{background:#f5f5f5}
caption{text-align:left;font-weight:600;font-size:13px;padding:3px 0}
img{max-width:100%;border:1px solid #eee;margin:6px 0} .muted{color:#666;font-size:13px}
.kpi{display:inline-block;margin:4px 16px 4px 0;padding:8px 12px;background:#f5f7fb;
border-radius:6px} .kpi b{font-size:20px;display:block}
"""


def render_html(
    title: str,
    subtitle: str,
    kpis: list[tuple[str, str]],
    sections: Sequence[ReportSection],
    plots_dir: str | os.PathLike[str] | None,
) -> str:
    """Render sections to one self-contained HTML page; PNGs also written to ``plots_dir``."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='muted'>{html.escape(subtitle)}</p>",
    ]
    if kpis:
        parts.append("<div>")
        for name, value in kpis:
            parts.append(f"<div class='kpi'><b>{html.escape(value)}</b>{html.escape(name)}</div>")
        parts.append("</div>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f"<p>{html.escape(sec.text)}</p>")
        for table in sec.tables:
            if isinstance(table, Table):
                parts.append(_table_html(table))
                continue
            caption, rows = table
            parts.append(f"<table><tr><th colspan='2'>{html.escape(caption)}</th></tr>")
            for k, v in rows:
                parts.append(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>")
            parts.append("</table>")
        for name, fig in sec.figures.items():
            png = png_bytes(fig)
            if plots_dir is not None:
                atomic_write_bytes(Path(plots_dir) / f"{name}.png", png)
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(
                f"<img alt='{html.escape(name)}' data-plot='{html.escape(name)}' "
                f"src='data:image/png;base64,{b64}'>"
            )
        if sec.html_extra:
            parts.append(sec.html_extra)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(path: str | os.PathLike[str], page: str) -> None:
    """Write the page atomically."""
    atomic_write_text(path, page)
