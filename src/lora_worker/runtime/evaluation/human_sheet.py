"""A blinded A/B sheet for the studio's staff, and its scoring.

`write_human_sheet` writes `human_eval_sheet.csv` (to fill in: one row per scenario, a `choice`
column for A, B or tie) and `human_eval_sheet.html` (the same items, easier to read), with the
base and adapted replies in seeded random positions and the items in seeded random order. Which
model is A in each row is only in the key file (`human_eval_key.json`), written elsewhere so the
raters never see it. `score_sheet` reads a filled-in CSV with its key and counts the same win /
tie / loss rates, with the same intervals, as the model judge (evaluation/preference.py).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_worker.runtime.evaluation.preference import (
    Preference,
    PreferenceSummary,
    preference_sentence,
    summarize_preferences,
)
from lora_worker.runtime.files import atomic_write_bytes, atomic_write_json

SHEET_CSV = "human_eval_sheet.csv"
SHEET_HTML = "human_eval_sheet.html"
KEY_NAME = "human_eval_key.json"
KEY_FORMAT = "lora-worker human-eval key 1"
COLUMNS = ("item", "earlier_messages", "user_message", "reply_A", "reply_B", "choice", "comment")
CHOICES = {"a": "A", "b": "B", "tie": "tie", "t": "tie", "=": "tie", "same": "tie", "equal": "tie"}


class SheetError(ValueError):
    """A sheet or key that cannot be scored; the message names the file and row."""


class KeyItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    scenario_id: str
    a: Preference = Field(description="The model whose reply is reply_A: adapted or base.")
    tags: dict[str, str] = Field(default_factory=dict)


class SheetKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = KEY_FORMAT
    job_id: str = ""
    seed: int
    sheet_sha256: str = Field(description="SHA-256 of the CSV as written (before anyone fills it in).")
    items: dict[str, KeyItem]


@dataclass(frozen=True)
class SheetFiles:
    csv: Path
    html: Path
    key: Path


class HumanScore(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    items: int
    answered: int
    unanswered: list[str] = Field(description="Items without a choice (left out of the rates).")
    summary: PreferenceSummary
    headline: str


# ----------------------------------------------------------------------------- writing


def _context(messages: Sequence[Mapping[str, Any]]) -> str:
    names = {"system": "Instructions", "user": "User", "assistant": "Consultant"}
    return "\n\n".join(
        f"{names.get(str(m.get('role')), m.get('role'))}: {m.get('content')}" for m in messages
    )


def _rows(
    scenarios: Sequence[Mapping[str, Any]], seed: int
) -> tuple[list[dict[str, str]], dict[str, KeyItem]]:
    rng = random.Random(seed)
    order = list(range(len(scenarios)))
    rng.shuffle(order)
    rows, key = [], {}
    for n, i in enumerate(order, start=1):
        s = scenarios[i]
        msgs = [m for m in s.get("messages") or [] if isinstance(m, Mapping)]
        a_model: Preference = "adapted" if rng.random() < 0.5 else "base"
        b_model = "base" if a_model == "adapted" else "adapted"
        item = str(n)
        rows.append(
            {
                "item": item,
                "earlier_messages": _context(msgs[:-1]),
                "user_message": str(msgs[-1].get("content") if msgs else ""),
                "reply_A": str(s.get(a_model) or ""),
                "reply_B": str(s.get(b_model) or ""),
                "choice": "",
                "comment": "",
            }
        )
        tags = {str(k): str(v) for k, v in (s.get("tags") or {}).items()}
        key[item] = KeyItem(scenario_id=str(s.get("id")), a=a_model, tags=tags)
    return rows, key


def _csv_bytes(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8-sig")  # the BOM makes spreadsheet programs read UTF-8


def _html(rows: list[dict[str, str]], job_id: str) -> str:
    e = html.escape
    items = []
    for r in rows:
        context = f"<details><summary>Earlier messages</summary><div class=t>{e(r['earlier_messages'])}</div></details>"
        items.append(
            f"<article><h2>Item {e(r['item'])}</h2>{context if r['earlier_messages'] else ''}"
            f"<h3>User</h3><div class=t>{e(r['user_message'])}</div><div class=g>"
            f"<div><h3>Reply A</h3><div class=t>{e(r['reply_A'])}</div></div>"
            f"<div><h3>Reply B</h3><div class=t>{e(r['reply_B'])}</div></div></div></article>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>Blind A/B review {e(job_id)}</title><style>"
        "body{font:15px/1.5 sans-serif;max-width:1000px;margin:24px auto;padding:0 20px;color:#1d2430}"
        "article{border-top:1px solid #ccd;padding:8px 0 16px}.g{display:grid;grid-template-columns:1fr 1fr;gap:12px}"
        ".t{white-space:pre-wrap;overflow-wrap:anywhere;background:#f4f5f8;padding:8px;border-radius:6px}"
        "h2{font-size:17px}h3{font-size:13px;color:#556;margin:8px 0 4px}</style></head><body>"
        f"<h1>Blind A/B review{': ' + e(job_id) if job_id else ''}</h1>"
        f"<p>{len(rows)} items. For each, read the conversation and the two replies, then write <b>A</b>, "
        f"<b>B</b> or <b>tie</b> in the <code>choice</code> column of {SHEET_CSV} for that item (the "
        "better reply: acknowledges the client's feelings, warm, specific and actionable, in the "
        "consultant's voice, safe). The two replies come from two models in random positions; "
        "do not try to guess which is which.</p>" + "".join(items) + "</body></html>\n"
    )


def write_human_sheet(
    scenarios: Sequence[Mapping[str, Any]], out_dir: Path, key_path: Path, *, seed: int, job_id: str = ""
) -> SheetFiles:
    """Write the sheet (CSV and HTML) into `out_dir` and the key to `key_path`; deterministic for
    the same scenarios (dicts of evidence.ScenarioResult) and seed."""
    rows, key_items = _rows(scenarios, seed)
    data = _csv_bytes(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    files = SheetFiles(out_dir / SHEET_CSV, out_dir / SHEET_HTML, key_path)
    atomic_write_bytes(files.csv, data)
    atomic_write_bytes(files.html, _html(rows, job_id).encode("utf-8"))
    key = SheetKey(job_id=job_id, seed=seed, sheet_sha256=hashlib.sha256(data).hexdigest(), items=key_items)
    atomic_write_json(files.key, key.model_dump(mode="json"), sort_keys=True)
    return files


# ----------------------------------------------------------------------------- scoring


def read_key(path: Path) -> SheetKey:
    try:
        key = SheetKey.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as err:
        raise SheetError(f"{path.name}: not a human-eval key ({str(err).splitlines()[0]})") from None
    if key.format != KEY_FORMAT:
        raise SheetError(f"{path.name}: key format {key.format!r}, expected {KEY_FORMAT!r}")
    return key


def _choice_column(fields: Sequence[str], name: str) -> str:
    for f in fields:
        if f.strip().lower().startswith("choice"):
            return f
    raise SheetError(f"{name}: no 'choice' column (columns: {', '.join(fields)})")


def read_choices(path: Path) -> dict[str, str]:
    """item -> 'A', 'B', 'tie' or '' (not answered); SheetError naming the row of a bad choice."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise SheetError(f"{path.name}: cannot read it: {err}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "item" not in reader.fieldnames:
        raise SheetError(f"{path.name}: no 'item' column; is this the human_eval_sheet.csv?")
    column = _choice_column(reader.fieldnames, path.name)
    out, problems = {}, []
    for n, row in enumerate(reader, start=2):  # spreadsheet row numbers: the header is row 1
        item, raw = (row.get("item") or "").strip(), (row.get(column) or "").strip()
        if not item:
            continue
        value = CHOICES.get(raw.lower(), None) if raw else ""
        if value is None:
            problems.append(f"row {n}, item {item}: choice {raw!r} is not A, B or tie")
            continue
        out[item] = value
    if problems:
        raise SheetError(f"{path.name}: " + "; ".join(problems))
    return out


def score_sheet(sheet: Path, key_path: Path) -> HumanScore:
    """Win / tie / loss of the adapted model from a filled-in sheet and its key."""
    key = read_key(key_path)
    choices = read_choices(sheet)
    unknown = sorted(set(choices) - set(key.items), key=lambda s: (len(s), s))
    if unknown:
        raise SheetError(
            f"{sheet.name}: item(s) {', '.join(unknown)} are not in {key_path.name}: a different sheet?"
        )
    items, unanswered = [], []
    for item in sorted(key.items, key=lambda s: (len(s), s)):
        k, choice = key.items[item], choices.get(item, "")
        if not choice:
            unanswered.append(item)
            continue
        b_model: Preference = "base" if k.a == "adapted" else "adapted"
        pref: Preference = k.a if choice == "A" else b_model if choice == "B" else "tie"
        items.append((pref, k.tags))
    summary = summarize_preferences(items, seed=key.seed)
    return HumanScore(
        items=len(key.items),
        answered=len(items),
        unanswered=unanswered,
        summary=summary,
        headline=preference_sentence(summary.overall, judged_by="the studio's reviewers"),
    )
