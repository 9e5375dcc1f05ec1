"""The report's plots as PNG bytes: the loss curve, held-out loss change per emotional arc, and the
judge's win/tie/loss shares. Each draws on a bare `Figure` on the Agg canvas (no pyplot global
state, safe from any thread) and writes no "Software" chunk, so the same dict gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lora_worker.runtime.delivery.report_view import number, section


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _points(rows: Any, y_key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for the rows that have both as finite numbers, in step order."""
    pairs = []
    for row in rows or []:
        if isinstance(row, Mapping):
            step, y = number(row.get("step")), number(row.get(y_key))
            if step is not None and y is not None:
                pairs.append((step, y))
    pairs.sort()
    return [p[0] for p in pairs], [p[1] for p in pairs]


def loss_plot(report: Mapping[str, Any]) -> bytes:
    """Training loss and held-out loss against optimizer step, with the base model's held-out loss."""
    history, metrics = section(report, "history"), section(report, "metrics")
    train_x, train_y = _points(history.get("train"), "loss")
    eval_x, eval_y = _points(history.get("eval"), "eval_loss")
    before = number(metrics.get("eval_loss_before"))
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
    return _png(fig)


def slices_plot(report: Mapping[str, Any]) -> bytes | None:
    """Mean change of held-out loss per emotional arc with its 95 % interval; None without arcs."""
    rows = [r for r in section(section(section(report, "evidence"), "slices"), "tables").get("arc") or []]
    rows = [r for r in rows if isinstance(r, Mapping) and number(r.get("mean_delta")) is not None]
    if not rows:
        return None
    fig = Figure(figsize=(8, 0.5 * len(rows) + 1.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = list(range(len(rows)))
    means = [float(r["mean_delta"]) for r in rows]
    lo, hi = [], []
    for r, m in zip(rows, means, strict=True):
        iv = r.get("interval_95")
        ok = isinstance(iv, list | tuple) and len(iv) == 2
        lo.append(m - float(iv[0]) if ok else 0.0)
        hi.append(float(iv[1]) - m if ok else 0.0)
    colors = ["tab:green" if m < 0 else "tab:red" for m in means]
    ax.barh(ys, means, xerr=[lo, hi], color=colors, alpha=0.7, capsize=4)
    ax.set_yticks(ys, [f"{r.get('value')} (n={r.get('n')})" for r in rows])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out loss change, after - before (nats per token; negative is better)")
    ax.set_title("Held-out loss change per emotional arc (95 % intervals)")
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def judge_plot(report: Mapping[str, Any]) -> bytes | None:
    """Stacked win / tie / loss shares, overall then per emotional arc; None without a judge."""
    summary = section(section(section(report, "evidence"), "judge"), "summary")
    overall = section(summary, "overall")
    if not overall:
        return None
    bars = [("all scenarios", overall)]
    for r in section(summary, "slices").get("arc") or []:
        if isinstance(r, Mapping):
            bars.append((str(r.get("value")), section(r, "rates")))
    fig = Figure(figsize=(8, 0.5 * len(bars) + 2.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = list(range(len(bars)))
    left = [0.0] * len(bars)
    for key, label, color in (
        ("win", "adapted preferred", "tab:green"),
        ("tie", "tie", "tab:gray"),
        ("loss", "base preferred", "tab:red"),
    ):
        widths = [number(section(rates, key).get("share")) or 0.0 for _, rates in bars]
        ax.barh(ys, widths, left=left, color=color, label=label, alpha=0.8)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(ys, [f"{name} (n={rates.get('n')})" for name, rates in bars])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of judged scenarios")
    ax.set_title("Blind pairwise judge: adapted vs base model")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, fontsize="small", frameon=False)
    return _png(fig)


def plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """Every plot the report has data for, by the key the report's sections use."""
    out = {"loss": loss_plot(report)}
    for key, draw in (("slices", slices_plot), ("judge", judge_plot)):
        png = draw(report)
        if png is not None:
            out[key] = png
    return out
