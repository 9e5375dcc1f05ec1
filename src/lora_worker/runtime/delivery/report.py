"""The evidence a job delivers with its adapter: `report.json`, `report.md` and `loss_curve.png`.

Other code builds the report dict (shape in `write_report`'s docstring); this module only renders
it. Every field may be missing or None (a job that failed half-way still gets a report), and the
output is a pure function of the dict: the same dict gives byte-identical files.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
PLOT_NAME = "loss_curve.png"

MISSING = "—"

# Human labels, in display order, for the known keys of the report's sections; unknown keys
# follow in sorted order with their raw name, so a new metric shows up without a code change.
METRIC_LABELS: dict[str, str] = {
    "eval_loss_before": "Held-out loss, base model",
    "eval_loss_after": "Held-out loss, with adapter",
    "perplexity_before": "Held-out perplexity, base model",
    "perplexity_after": "Held-out perplexity, with adapter",
    "train_loss": "Training loss (last logged step)",
    "steps": "Optimizer steps",
    "epochs": "Epochs",
    "tokens_trained": "Tokens trained",
    "tokens_per_second": "Throughput (tokens/s)",
    "peak_gpu_memory_gib": "Peak GPU memory (GiB)",
    "padding_fraction": "Padding share of trained positions",
}
DATASET_LABELS: dict[str, str] = {
    "format": "Format",
    "conversations": "Conversations",
    "pairs": "Prompt/response pairs",
    "skipped_null_targets": "Skipped (no target response)",
    "train_conversations": "Training conversations",
    "eval_conversations": "Held-out conversations",
    "examples": "Training examples",
    "truncated": "Examples split or cut to max_seq_length (at turn boundaries)",
    "dropped": "Targets dropped (longer than max_seq_length alone)",
    "tokens_total": "Tokens per epoch (conversations folded)",
    "tokens_unfolded": "Tokens per epoch pair by pair (without folding)",
    "trainable_tokens": "Trainable tokens (responses only)",
    "fold_ratio": "Token saving from folding (x)",
    "folded_conversations": "Conversations folded",
    "unfolded_conversations": "Conversations trained pair by pair (inconsistent pairs)",
    "eval_examples": "Held-out examples",
    "eval_tokens": "Held-out tokens",
    "max_seq_length": "max_seq_length",
    "tokenizer": "Tokenizer",
}


def write_report(job_dir: Path, report: dict) -> dict[str, Path]:
    """Write `report.json`, `report.md` and `loss_curve.png` into `job_dir` (created if missing).

    Report shape (every key optional, every value may be None):
      job_id, status, base_model, created_at (ISO 8601),
      dataset: {format, conversations, pairs, skipped_null_targets, train_conversations,
                eval_conversations, examples, truncated, dropped, tokens_total, tokens_unfolded,
                trainable_tokens},
      settings: {hyperparameter: value},
      metrics: {train_loss, eval_loss_before, eval_loss_after, perplexity_before, perplexity_after,
                steps, epochs, tokens_trained, tokens_per_second, peak_gpu_memory_gib},
      history: {train: [{step, loss, learning_rate, grad_norm}], eval: [{step, eval_loss}]},
      samples: [{conversation_id, prompt, reference, base, adapted}],
      timings_s: {stage: seconds}, gpu_seconds, cost_usd, eval_cost_usd,
      adapter: {path, archive, sha256, size_bytes} | None.

    Returns {"json": path, "markdown": path, "plot": path}. Each file is written to a temporary
    name and renamed, so a reader never sees a half-written report.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": job_dir / JSON_NAME, "markdown": job_dir / MARKDOWN_NAME, "plot": job_dir / PLOT_NAME}
    _atomic_write(paths["json"], render_json(report).encode("utf-8"))
    _atomic_write(paths["plot"], render_loss_plot(report))
    _atomic_write(paths["markdown"], render_markdown(report, plot_name=PLOT_NAME).encode("utf-8"))
    return paths


# --------------------------------------------------------------------------------------------
# JSON


def render_json(report: Mapping[str, Any]) -> str:
    """Indented, key-sorted JSON. Non-finite floats (a diverged loss) become null, because NaN and
    Infinity are not JSON and strict parsers (browsers, jq) reject them; Paths become strings."""
    return (
        json.dumps(_json_safe(report), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------------------------
# Plot


def _points(rows: Any, y_key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for the rows that have both as finite numbers, in step order."""
    pairs = []
    for row in rows or []:
        if not isinstance(row, Mapping):
            continue
        step, y = _number(row.get("step")), _number(row.get(y_key))
        if step is not None and y is not None:
            pairs.append((step, y))
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def render_loss_plot(report: Mapping[str, Any]) -> bytes:
    """PNG bytes: training loss and held-out loss against optimizer step, on one set of axes.

    Uses a bare `Figure` on the Agg canvas rather than pyplot, so it touches no global backend
    state and is safe to call from any thread.
    """
    history = _section(report, "history")
    metrics = _section(report, "metrics")
    train_x, train_y = _points(history.get("train"), "loss")
    eval_x, eval_y = _points(history.get("eval"), "eval_loss")
    before = _number(metrics.get("eval_loss_before"))

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train_x:
        ax.plot(train_x, train_y, label="training loss", color="tab:blue", linewidth=1.2)
    if eval_x:
        ax.plot(eval_x, eval_y, label="held-out loss", color="tab:orange", marker="o", linewidth=1.5)
    if before is not None:
        # The base model's held-out loss is the bar the adapter has to clear.
        ax.axhline(before, color="tab:gray", linestyle="--", linewidth=1, label="held-out loss, base model")
    if not (train_x or eval_x or before is not None):
        ax.text(0.5, 0.5, "no loss history recorded", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy, nats)")
    ax.set_title(f"Loss — job {report.get('job_id') or 'unknown'}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()

    buf = io.BytesIO()
    # No "Software" text chunk: keeps the bytes identical across matplotlib patch releases.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Markdown


def headline(report: Mapping[str, Any]) -> str:
    """One honest sentence on whether the adapter helped on held-out data."""
    metrics = _section(report, "metrics")
    before = _number(metrics.get("eval_loss_before"))
    after = _number(metrics.get("eval_loss_after"))
    if before is None or after is None:
        return "No held-out evaluation is available for this job, so there is no before/after comparison."

    ppl_before = _number(metrics.get("perplexity_before"))
    ppl_after = _number(metrics.get("perplexity_after"))
    notes = []
    if after != before and before != 0:
        notes.append(f"{(after - before) / before * 100:+.1f} %")
    if ppl_before is not None and ppl_after is not None:
        notes.append(f"perplexity {_fmt(ppl_before, 2)} → {_fmt(ppl_after, 2)}")
    detail = f" ({', '.join(notes)})" if notes else ""
    n_eval = _number(_section(report, "dataset").get("eval_conversations"))
    on = ""
    if n_eval is not None:
        on = f" on {int(n_eval):,} held-out conversation{'' if n_eval == 1 else 's'}"

    if after == before:
        return f"Held-out loss was unchanged at {_fmt(before, 4)}{detail}{on}."
    if after < before:
        return f"Held-out loss fell from {_fmt(before, 4)} to {_fmt(after, 4)}{detail}{on}."
    return (
        f"Held-out loss rose from {_fmt(before, 4)} to {_fmt(after, 4)}{detail}{on}: "
        "the adapter does worse than the base model on held-out data."
    )


def render_markdown(report: Mapping[str, Any], *, plot_name: str = PLOT_NAME) -> str:
    """A client-facing summary of the job; deterministic for a given dict."""
    job_id = report.get("job_id") or "unknown"
    metrics = _section(report, "metrics")
    dataset = _section(report, "dataset")
    settings = _section(report, "settings")
    timings = _section(report, "timings_s")

    out: list[str] = [f"# Fine-tuning report: {_inline(job_id)}", ""]
    facts = [
        ("Status", report.get("status")),
        ("Base model", report.get("base_model")),
        ("Created", report.get("created_at")),
    ]
    out += [f"- **{label}:** {_code(value)}" for label, value in facts]
    out += ["", f"**{headline(report)}**", ""]

    out += ["## Results", ""]
    out += _table(("Metric", "Value"), _labelled_rows(metrics, METRIC_LABELS))
    out += ["", f"![loss]({plot_name})", ""]

    out += ["## Dataset", ""]
    out += _table(("Quantity", "Value"), _labelled_rows(dataset, DATASET_LABELS))
    out += [""]

    out += ["## Before and after", ""]
    samples = [s for s in report.get("samples") or [] if isinstance(s, Mapping)]
    if not samples:
        out += ["No held-out samples were generated.", ""]
    else:
        out += [
            "Replies to held-out prompts from the base model and from the base model with the adapter, "
            "next to the reference reply from the dataset.",
            "",
        ]
    for i, sample in enumerate(samples, 1):
        conv = sample.get("conversation_id")
        out += [f"### Sample {i}" + (f": {_inline(conv)}" if conv not in (None, "") else ""), ""]
        for key, label in (
            ("prompt", "Prompt (last user message)"),
            ("reference", "Reference reply"),
            ("base", "Base model"),
            ("adapted", "With adapter"),
        ):
            out += [f"**{label}**", "", *_quote(sample.get(key)), ""]

    out += ["## Settings", ""]
    out += _table(
        ("Setting", "Value"),
        [(_inline(k), _inline(_fmt(settings[k]))) for k in sorted(settings)],
        numeric=False,
    )
    out += [""]

    out += ["## Time and cost", ""]
    rows = [(_inline(stage), _fmt(timings[stage], 1)) for stage in timings]  # pipeline order, as given
    numeric = [_number(v) for v in timings.values()]
    if numeric and all(v is not None for v in numeric):
        rows.append(("**total**", f"**{_fmt(sum(numeric), 1)}**"))  # type: ignore[arg-type]
    out += _table(("Stage", "Seconds"), rows)
    out += [""]
    cost_rows = [
        ("GPU time (s)", _fmt(report.get("gpu_seconds"), 1)),
        ("Cost (USD)", _usd(report.get("cost_usd"))),
        ("of which held-out evaluation (USD)", _usd(report.get("eval_cost_usd"))),
    ]
    out += _table(("Item", "Value"), cost_rows)
    out += [""]

    out += ["## Adapter", ""]
    adapter = report.get("adapter")
    if isinstance(adapter, Mapping) and adapter:
        adapter_rows = [
            ("Directory", _code(adapter.get("path"))),
            ("Archive", _code(adapter.get("archive"))),
            ("SHA-256", _code(adapter.get("sha256"))),
            ("Size", _size(adapter.get("size_bytes"))),
        ]
        out += _table(("Item", "Value"), adapter_rows, numeric=False)
    else:
        out += ["No adapter was produced."]
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# Formatting helpers (all pure)


def _section(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    """The value as a finite float, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 4) -> str:
    """Display form: ints with thousands separators, floats to `digits` decimals (or 4 significant
    figures when tiny, e.g. a learning rate), non-finite floats as-is, None as a dash."""
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
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(_json_safe(value), sort_keys=True, ensure_ascii=False)
    return str(value)


def _usd(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"${number:,.4f}" if 0 < abs(number) < 0.01 else f"${number:,.2f}"


def _size(value: Any) -> str:
    number = _number(value)
    if number is None:
        return MISSING
    mib = number / 2**20
    return f"{int(number):,} bytes ({mib:,.1f} MiB)"


def _inline(value: Any) -> str:
    """Text safe inside one table cell or one line: HTML escaped (no raw HTML reaches the viewer),
    pipes escaped (they would split the cell), newlines as <br>."""
    text = html.escape(str(value), quote=False).replace("|", "\\|")
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def _code(value: Any) -> str:
    """Inline code span; the fence is one backtick longer than any run inside the value."""
    if value in (None, ""):
        return MISSING
    text = re.sub(r"\s+", " ", str(value)).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def _quote(value: Any) -> list[str]:
    """Free text (a prompt or a model reply) as a markdown blockquote.

    The text is kept as markdown, since chat models answer in markdown, but it cannot break out:
    every line is quoted (a fence left open by a truncated reply closes with the quote), raw HTML is
    escaped, and single newlines become hard breaks (trailing backslash) so line structure survives,
    except inside code fences, where lines are already literal.
    """
    if value is None or str(value).strip() == "":
        return ["> *(empty)*"]
    lines = (
        html.escape(str(value).strip("\r\n"), quote=False)
        .replace("\r\n", "\n")
        .replace("\r", "\n")
        .split("\n")
    )
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
        if not line:
            out.append(">")
        else:
            out.append(f"> {line}\\" if hard_break else f"> {line}")
    return out


def _labelled_rows(section: Mapping[str, Any], labels: Mapping[str, str]) -> list[tuple[str, str]]:
    known = [k for k in labels if k in section]
    extra = sorted(k for k in section if k not in labels)
    rows = []
    for key in known + extra:
        value = section[key]
        digits = 2 if key.startswith("perplexity") or key.endswith(("_gib", "_per_second", "epochs")) else 4
        rows.append((_inline(labels.get(key, key)), _inline(_fmt(value, digits))))
    return rows


def _table(header: tuple[str, str], rows: Iterable[tuple[str, str]], *, numeric: bool = True) -> list[str]:
    """Two-column table; `numeric` right-aligns the value column so digits line up."""
    rows = list(rows)
    if not rows:
        return ["(none recorded)"]
    rule = "|---|---:|" if numeric else "|---|---|"
    return [f"| {header[0]} | {header[1]} |", rule, *(f"| {a} | {b} |" for a, b in rows)]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
