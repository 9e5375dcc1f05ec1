"""A configuration's result record: its step statistics, MFU, ratios to the seed recipe, and how
records are shown. Plain data in, plain data out; nothing here touches a GPU.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from lora_worker.tools.bench.shapes import PROJECT_RECIPES, Shape, mfu

VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "accelerate")


def installed_versions() -> dict[str, str | None]:
    """Installed versions of what the bench runs on (None: not installed), read from metadata so
    the parent process never imports torch or bitsandbytes (which would open a CUDA context)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in VERSIONED:
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


def step_stats(step_s: Sequence[float], ends: Sequence[float], tokens_per_step: int) -> dict:
    """Median step time after the warm-up step, and the rates it gives (tokens per second)."""
    if not step_s:
        return {"step_s": []}
    timed = list(step_s[1:]) or list(step_s)  # the first step compiles kernels and allocates state
    median = statistics.median(timed)
    out = {
        "step_s": [round(x, 4) for x in step_s],
        "median_step_s": round(median, 4),
        "tokens_per_s": round(tokens_per_step / median, 1) if median > 0 else 0.0,
    }
    intervals = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    if intervals:  # end-to-end: includes the Trainer's data loading and logging between steps
        out["tokens_per_s_wall"] = round(tokens_per_step / statistics.median(intervals), 1)
    return out


def summarize(rec: dict, shape: Shape, peak: float | None) -> dict:
    """Adds MFU (fraction of the card's dense bf16 peak) to a measured result."""
    tps = rec.get("tokens_per_s") or 0.0
    value = mfu(tps, shape.flops_per_token(), peak)
    rec["mfu"] = round(value, 4) if value is not None else None
    return rec


def attach_ratios(results: list[dict]) -> list[dict]:
    """For each result of the project's path (project, project-offload, packed): its tokens/s and peak
    memory over the seed's at the same budget."""
    seeds = {r["budget"]: r for r in results if r.get("recipe") == "seed"}
    for r in results:
        if r.get("recipe") not in PROJECT_RECIPES:
            continue
        s = seeds.get(r["budget"])
        r["vs_seed"] = None
        r["memory_vs_seed"] = None
        if s is None:
            r["seed_at_budget"] = "not measured"
            continue
        if s.get("oom"):
            r["seed_at_budget"] = "out of memory"
            continue
        if not s.get("tokens_per_s"):
            r["seed_at_budget"] = "failed"
            continue
        r["seed_at_budget"] = "measured"
        if r.get("tokens_per_s"):
            r["vs_seed"] = round(r["tokens_per_s"] / s["tokens_per_s"], 3)
        if r.get("peak_reserved_gib") and s.get("peak_reserved_gib") and not r.get("oom"):
            r["memory_vs_seed"] = round(r["peak_reserved_gib"] / s["peak_reserved_gib"], 3)
    return results


def status(rec: dict) -> str:
    return "ok" if rec.get("ok") else ("OOM" if rec.get("oom") else "failed")


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else spec.format(v)


TABLE_HEAD = [
    "config",
    "budget",
    "tok/s",
    "step s",
    "alloc GiB",
    "resv GiB",
    "MFU",
    "vs seed",
    "optim",
    "liger",
]


def format_table(results: Sequence[dict]) -> str:
    """The records as an aligned text table."""
    head = [*TABLE_HEAD, "status"]
    rows = [
        [
            f"{r['recipe']}:{r['rows']}x{r['seq']}",
            str(r["budget"]),
            _fmt(r.get("tokens_per_s"), "{:.0f}"),
            _fmt(r.get("median_step_s"), "{:.3f}"),
            _fmt(r.get("peak_alloc_gib"), "{:.1f}"),
            _fmt(r.get("peak_reserved_gib"), "{:.1f}"),
            _fmt(r.get("mfu"), "{:.1%}"),
            _fmt(r.get("vs_seed"), "{:.2f}x"),
            str(r.get("optimizer", "-")),
            str(r.get("liger", "-")),
            status(r),
        ]
        for r in results
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def one_line(rec: dict) -> str:
    """A record in one line, as printed after each configuration."""
    if rec.get("ok"):
        return (
            f"{rec['tokens_per_s']:.0f} tok/s, step {rec['median_step_s']:.3f} s, "
            f"peak {rec.get('peak_reserved_gib', '-')} GiB reserved "
            f"(build {rec.get('build_s', '-')} s, wall {rec.get('wall_s', '-')} s)"
        )
    if rec.get("oom"):
        return f"out of memory ({rec.get('failed_phase', '?')}), peak {rec.get('peak_alloc_gib', '-')} GiB"
    return f"failed: {rec.get('error')}"
