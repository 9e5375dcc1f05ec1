"""The evidence a job delivers with its adapter: `report.json`, `report.md`, `loss_curve.png` and
`report.html` (one self-contained page for the client: plots embedded, no network).

Other code builds the report dict (`contracts.Report`, dumped); this module only renders it. Every
field may be missing or None (a job that failed half-way still gets a report), and the output is a
pure function of the dict: the same dict gives byte-identical files. Model text never reaches a
page as markup: the markdown escapes raw HTML and the HTML page escapes everything.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_worker.runtime.delivery.report_evidence import MD_SCENARIOS
from lora_worker.runtime.delivery.report_html import render_html
from lora_worker.runtime.delivery.report_plots import loss_plot, plots
from lora_worker.runtime.delivery.report_sections import build_sections, headline
from lora_worker.runtime.delivery.report_view import (
    Bullets,
    Image,
    Para,
    Pre,
    Section,
    SideBySide,
    Table,
    number,
    section,
)
from lora_worker.runtime.evaluation.human_sheet import write_human_sheet
from lora_worker.runtime.files import atomic_write_bytes, dumps_strict

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
PLOT_NAME = "loss_curve.png"
HTML_NAME = "report.html"

__all__ = ["headline", "render_json", "render_loss_plot", "render_markdown", "write_report"]


def write_report(job_dir: Path, report: dict, *, human_key_path: Path | None = None) -> dict[str, Path]:
    """Write report.json, report.md, loss_curve.png and report.html into `job_dir` (created if
    missing), each atomically. Returns {"json", "markdown", "plot", "html": path}.

    With `human_key_path`, and scenarios in report["evidence"], the blinded human A/B sheet
    (human_eval_sheet.html and .csv) is written into `job_dir` too and its key to `human_key_path`
    (keep it outside what is handed to the raters); the paths come back as "human_sheet_html",
    "human_sheet_csv" and "human_key". Positions are randomised with settings.seed.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    images = plots(report)
    paths = {
        "json": job_dir / JSON_NAME,
        "markdown": job_dir / MARKDOWN_NAME,
        "plot": job_dir / PLOT_NAME,
        "html": job_dir / HTML_NAME,
    }
    atomic_write_bytes(paths["json"], render_json(report).encode("utf-8"))
    atomic_write_bytes(paths["plot"], images["loss"])
    atomic_write_bytes(paths["markdown"], render_markdown(report, plot_name=PLOT_NAME).encode("utf-8"))
    atomic_write_bytes(paths["html"], render_html(report, images).encode("utf-8"))
    scenarios = section(report, "evidence").get("scenarios") or []
    if human_key_path is not None and scenarios:
        seed = number(section(report, "settings").get("seed"))
        sheet = write_human_sheet(
            scenarios,
            job_dir,
            Path(human_key_path),
            seed=int(seed or 0),
            job_id=str(report.get("job_id") or ""),
        )
        paths.update(human_sheet_html=sheet.html, human_sheet_csv=sheet.csv, human_key=sheet.key)
    return paths


def render_json(report: Mapping[str, Any]) -> str:
    """Indented, key-sorted JSON that strict parsers accept: non-finite floats (a diverged loss)
    become null, paths strings."""
    return dumps_strict(report, indent=2, sort_keys=True) + "\n"


def render_loss_plot(report: Mapping[str, Any]) -> bytes:
    return loss_plot(report)


# ----------------------------------------------------------------------------- markdown


def render_markdown(report: Mapping[str, Any], *, plot_name: str = PLOT_NAME) -> str:
    """The client report as markdown; deterministic for a given dict."""
    out = [f"# Fine-tuning report: {_inline(report.get('job_id') or 'unknown')}", ""]
    for sec in build_sections(report, scenario_limit=MD_SCENARIOS):
        out += _md_section(sec, plot_name)
    if section(report, "evidence"):
        out += ["Plots of the slices and of the judge's shares are in report.html.", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _md_section(sec: Section, plot_name: str) -> list[str]:
    out = [f"## {sec.title}", ""]
    for part in sec.parts:
        if isinstance(part, Para):
            text = _inline(part.text)
            out += [f"**{text}**" if part.strong else text, ""]
        elif isinstance(part, Pre):
            out += ([f"**{_inline(part.summary)}**", ""] if part.summary else []) + _fenced(part.text)
        elif isinstance(part, Bullets):
            out += [f"- {_inline(item)}" for item in part.items] + [""]
        elif isinstance(part, Image):
            if part.key == "loss":
                out += [f"![{part.alt}]({plot_name})", ""]
        elif isinstance(part, Table):
            out += _table(part) + [""]
        elif isinstance(part, SideBySide):
            out += _side_by_side(part)
    return out


def _side_by_side(part: SideBySide) -> list[str]:
    out = [f"### {_inline(part.title)}", ""]
    if part.meta:
        out += [f"*{_inline(part.meta)}*", ""]
    for label, text, flag in part.fields:
        out += [f"**{_inline(label)}**" + (f" *({_inline(flag)})*" if flag else ""), "", *_quote(text), ""]
    return out


def _table(t: Table) -> list[str]:
    if not t.rows:
        return ["(none recorded)"]
    rule = "|" + "|".join("---:" if t.is_numeric(i) else "---" for i in range(len(t.columns))) + "|"
    head = "| " + " | ".join(_inline(c) for c in t.columns) + " |"
    return [head, rule, *("| " + " | ".join(_inline(c) for c in row) + " |" for row in t.rows)]


def _inline(value: Any) -> str:
    """Text safe inside one table cell or line: HTML escaped (no raw HTML reaches the viewer),
    pipes escaped (they would split a cell), newlines as <br>."""
    text = html.escape(str(value), quote=False).replace("|", "\\|")
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def _fenced(text: str) -> list[str]:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", *text.splitlines(), fence, ""]


_FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def _quote(value: Any) -> list[str]:
    """Free text (a prompt or a model reply) as a markdown blockquote.

    The text stays markdown, since chat models answer in markdown, but it cannot break out: every
    line is quoted (a fence left open by a cut reply closes with the quote), raw HTML is escaped,
    and single newlines become hard breaks (trailing backslash), except inside code fences.
    """
    if value is None or str(value).strip() == "":
        return ["> *(empty)*"]
    text = html.escape(str(value).strip("\r\n"), quote=False).replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    out: list[str] = []
    in_fence = False
    for i, line in enumerate(lines):
        line = line.rstrip()
        if _FENCE.match(line):
            in_fence = not in_fence
            out.append(f"> {line}")
            continue
        next_blank = i + 1 >= len(lines) or not lines[i + 1].strip()
        hard_break = not in_fence and line and not next_blank and not line.endswith("\\")
        out.append(">" if not line else f"> {line}\\" if hard_break else f"> {line}")
    return out
