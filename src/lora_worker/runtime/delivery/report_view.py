"""What the client report says, as plain values: sections of paragraphs, tables, lists, images and
side-by-side texts, built from the report dict alone. `report.md` and `report.html` render the same
sections, so they cannot disagree; every text here is plain (each renderer escapes it).

Client-facing hygiene lives here: numbers formatted for people, no absolute worker paths (file
and folder names only), "GPU time" only when a GPU ran the job, and the stage total explained
against the job's wall time. Every field may be missing (a job that failed half-way still gets a
report).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from pydantic import ValidationError

from lora_worker.runtime.data.prepare import DatasetSummary, summary_rows

MISSING = "—"


@dataclass(frozen=True)
class Para:
    text: str
    strong: bool = False


@dataclass(frozen=True)
class Pre:
    """Literal text (a rubric), shown as it is."""

    text: str
    summary: str = ""


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Image:
    key: str  # which plot: "loss", "slices", "judge"
    alt: str


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    numeric: tuple[bool, ...] = ()  # per column: right-aligned digits

    def is_numeric(self, i: int) -> bool:
        return self.numeric[i] if i < len(self.numeric) else False


@dataclass(frozen=True)
class SideBySide:
    """One prompt and the replies to it: `fields` are (label, text, flag); flag marks a reply cut
    at the token limit."""

    title: str
    meta: str
    fields: list[tuple[str, str, str]]


Part = Para | Pre | Bullets | Image | Table | SideBySide


@dataclass
class Section:
    id: str
    title: str
    parts: list[Part] = field(default_factory=list)


# ----------------------------------------------------------------------------- formatting


def section(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def number(value: Any) -> float | None:
    """The value as a finite float, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any, digits: int = 4) -> str:
    """Ints with thousands separators, floats to `digits` decimals (4 significant figures when tiny),
    None as a dash, lists joined with commas, mappings as `key value` pairs."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 10 ** -min(digits, 3):
            return f"{value:.4g}"
        return f"{value:,.{digits}f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {fmt(v, digits)}" for k, v in value.items()) or "none"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v, digits) for v in value) or "none"
    return client_text(str(value))


def setting(value: Any) -> str:
    """A setting as people write it: 30 not 30.0000, 0.0002 not 2e-04, yes/no, lists joined."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.1e}"
    return fmt(value)


def seconds(value: Any) -> str:
    v = number(value)
    if v is None:
        return MISSING
    return "< 0.1" if 0 < v < 0.05 else f"{v:,.1f}"


def usd(value: Any) -> str:
    v = number(value)
    return MISSING if v is None else f"${v:,.4f}" if 0 < abs(v) < 0.01 else f"${v:,.2f}"


def pct(value: Any, signed: bool = False, digits: int = 0) -> str:
    v = number(value)
    return MISSING if v is None else f"{v * 100:+.{digits}f} %" if signed else f"{v * 100:.{digits}f} %"


def interval(iv: Any, *, as_pct: bool = False, digits: int = 4, signed: bool = True) -> str:
    """`[lo, hi]` of a 95 % interval, or a dash when there is none (a single item)."""
    if not isinstance(iv, list | tuple) or len(iv) != 2 or any(number(x) is None for x in iv):
        return MISSING
    if as_pct:
        return (
            f"{iv[0] * 100:+.0f} to {iv[1] * 100:+.0f} points"
            if signed
            else f"{iv[0] * 100:.0f}-{iv[1] * 100:.0f} %"
        )
    return f"[{iv[0]:+.{digits}f}, {iv[1]:+.{digits}f}]"


def size(value: Any) -> str:
    v = number(value)
    return MISSING if v is None else f"{int(v):,} bytes ({v / 2**20:,.1f} MiB)"


# An absolute path of two or more parts, not inside a URL: shown by its last part only, since the
# worker's folders mean nothing to a client and say more about the machine than they should.
_ABS_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"<>|,;()\[\]]+/)+([^\s/'\"<>|,;()\[\]]+)")


def client_text(text: str) -> str:
    return _ABS_PATH.sub(r"\1", text)


def file_name(value: Any) -> str:
    return MISSING if value in (None, "") else PurePosixPath(str(value)).name


def model_name(value: Any) -> str:
    """A Hub id as it is; a local folder by its name."""
    if value in (None, ""):
        return MISSING
    text = str(value)
    return f"{PurePosixPath(text).name} (local folder)" if text.startswith("/") else text


def dataset_rows(dataset: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Readable (label, value) rows: the dataset summary's own titles when it validates, else a
    flat fallback for other dicts (older reports)."""
    try:
        rows = summary_rows(DatasetSummary.model_validate(dict(dataset)))
    except (ValidationError, TypeError):
        rows = [
            (k.replace("_", " ").capitalize(), fmt(v))
            for k, v in dataset.items()
            if k not in ("warnings", "notes") and not isinstance(v, Mapping)
        ]
    return [(client_text(a), _digits(client_text(b))) for a, b in rows]


def _digits(text: str) -> str:
    return f"{int(text):,}" if re.fullmatch(r"-?\d{4,}", text) else text
