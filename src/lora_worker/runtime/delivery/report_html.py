"""`report.html`: the client report as one self-contained page.

Plots are embedded as data: URIs and the style is inline, so the file opens anywhere, offline, and
can be mailed as it is. Every text is HTML-escaped, and a Content-Security-Policy allows no script
and no network at all: a model reply that contains markup shows as text and can never run.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from typing import Any

from lora_worker.runtime.delivery.report_sections import VERDICT_WORDS, build_sections
from lora_worker.runtime.delivery.report_view import (
    Bullets,
    Image,
    Para,
    Pre,
    Section,
    SideBySide,
    Table,
)

REPLY_LABELS = ("Base model", "With adapter")  # shown side by side; other fields span the width
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
:root { --ink: #1d2430; --muted: #5b6576; --line: #d9dee7; --bg: #f6f7fa; --good: #1b7f3b; --bad: #b42318; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--ink); background: var(--bg); }
header, main, nav { max-width: 1080px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 28px; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 0 0 12px; border-bottom: 1px solid var(--line); padding-bottom: 6px; }
h3 { font-size: 16px; margin: 18px 0 4px; }
nav { font-size: 13px; margin: 12px auto 20px; }
nav a { color: var(--muted); margin-right: 14px; text-decoration: none; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 22px; margin: 0 0 18px; }
.badge { display: inline-block; padding: 3px 10px; border-radius: 12px; font-weight: 600; font-size: 13px;
         background: #e7eaf0; }
.badge.improved { background: #dcf3e3; color: var(--good); }
.badge.worse { background: #fde4e1; color: var(--bad); }
.strong { font-weight: 600; font-size: 16px; }
table { border-collapse: collapse; margin: 10px 0 14px; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 12px 5px 0; text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; padding-left: 12px; }
img { max-width: 100%; height: auto; display: block; margin: 10px 0; }
.meta { color: var(--muted); font-size: 13px; margin: 0 0 8px; }
.pair { border-top: 1px solid var(--line); padding-top: 6px; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.cell { background: var(--bg); border-radius: 6px; padding: 8px 12px; min-width: 0; }
.cell.wide { grid-column: 1 / -1; }
.cell h4 { margin: 0 0 4px; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.cell .flag { color: var(--bad); text-transform: none; letter-spacing: 0; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
pre { white-space: pre-wrap; background: var(--bg); padding: 10px; border-radius: 6px; }
@media (max-width: 720px) { .grid { grid-template-columns: 1fr; } }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _image(part: Image, images: Mapping[str, bytes]) -> str:
    png = images.get(part.key)
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(part.alt)}">'


def _table(t: Table) -> str:
    if not t.rows:
        return "<p>(none recorded)</p>"

    def cls(i: int) -> str:
        return ' class="num"' if t.is_numeric(i) else ""

    head = "".join(f"<th{cls(i)}>{_e(c)}</th>" for i, c in enumerate(t.columns))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in t.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _side_by_side(part: SideBySide) -> str:
    cells = []
    for label, text, flag in part.fields:
        wide = "" if label in REPLY_LABELS else " wide"
        mark = f' <span class="flag">({_e(flag)})</span>' if flag else ""
        body = _e(text) if text.strip() else "<em>(empty)</em>"
        cells.append(
            f'<div class="cell{wide}"><h4>{_e(label)}{mark}</h4><div class="text">{body}</div></div>'
        )
    meta = f'<p class="meta">{_e(part.meta)}</p>' if part.meta else ""
    return f'<article class="pair"><h3>{_e(part.title)}</h3>{meta}<div class="grid">{"".join(cells)}</div></article>'


def _part(part: Any, images: Mapping[str, bytes]) -> str:
    if isinstance(part, Para):
        return f'<p class="strong">{_e(part.text)}</p>' if part.strong else f"<p>{_e(part.text)}</p>"
    if isinstance(part, Pre):
        return (
            f"<details><summary>{_e(part.summary or 'Details')}</summary><pre>{_e(part.text)}</pre></details>"
        )
    if isinstance(part, Bullets):
        return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in part.items) + "</ul>"
    if isinstance(part, Image):
        return _image(part, images)
    if isinstance(part, Table):
        return _table(part)
    if isinstance(part, SideBySide):
        return _side_by_side(part)
    raise TypeError(f"unknown report part {type(part).__name__}")


def _section(sec: Section, images: Mapping[str, bytes]) -> str:
    body = "\n".join(_part(p, images) for p in sec.parts)
    return f'<section id="{_e(sec.id)}">\n<h2>{_e(sec.title)}</h2>\n{body}\n</section>'


def render_html(report: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The page for `report` with `images` (plot key -> PNG bytes); deterministic for given inputs."""
    job = report.get("job_id") or "unknown"
    sections = build_sections(report)
    verdict = str(report.get("verdict") or "")
    badge = (
        f'<p><span class="badge {_e(verdict)}">{_e(VERDICT_WORDS.get(verdict, verdict))}</span></p>'
        if verdict
        else ""
    )
    nav = "".join(f'<a href="#{_e(s.id)}">{_e(s.title)}</a>' for s in sections)
    body = "\n".join(_section(s, images) for s in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Fine-tuning report: {_e(job)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<header><h1>Fine-tuning report: {_e(job)}</h1>{badge}</header>\n"
        f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
