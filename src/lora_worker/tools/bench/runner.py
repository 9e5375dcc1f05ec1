"""The parent side of a bench run: each configuration in a fresh subprocess, the JSON document kept
current after each, and the search for the largest budget that fits.

The parent never imports torch or bitsandbytes: a CUDA context in the parent would take memory
from the children it measures. Card facts come from the children's records.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lora_worker
from lora_worker.runtime.files import atomic_write_json
from lora_worker.tools.bench.record import attach_ratios, installed_versions, summarize
from lora_worker.tools.bench.shapes import RunSpec, Shape, peak_flops

RESULT_MARK = "BENCH_RESULT "  # the line a `--one` child prints its result on
SCHEMA = 1
CHILD_MODULE = "lora_worker.tools.bench.cli"
LOG_TAIL_CHARS = 3000


class Runner:
    """Runs configurations in subprocesses and keeps the JSON document up to date after each."""

    def __init__(self, args: argparse.Namespace, shape: Shape, command: list[str]):
        self.args, self.shape = args, shape
        self.doc: dict[str, Any] = {
            "tool": "lora_worker.tools.bench",
            "schema": SCHEMA,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
            "shape": asdict(shape),
            "shape_name": args.shape,
            "flops_per_token": shape.flops_per_token(),
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout},
            "cap_gib": args.cap_gib,
            "steps": args.steps,
            "versions": installed_versions(),
            "complete": False,
            "results": [],
        }
        self.out: Path | None = Path(args.out) if args.out else None
        self.child: subprocess.Popen | None = None

    def config(self, spec: RunSpec, steps: int) -> dict:
        a = self.args
        return {
            "recipe": spec.recipe,
            "rows": spec.rows,
            "seq": spec.seq,
            "steps": steps,
            "shape": asdict(self.shape),
            "cap_gib": a.cap_gib,
            "lora_r": a.lora_r,
            "lora_alpha": a.lora_alpha,
            "lora_dropout": a.lora_dropout,
            "seed": 0,
            "label_fraction": 0.5,  # assistant-only labels cover roughly the second half of a chat
        }

    def run(self, spec: RunSpec, steps: int | None = None) -> dict:
        cfg = self.config(spec, steps or self.args.steps)
        rec = run_subprocess(cfg, timeout_s=self.args.config_timeout_s, on_start=self._started)
        self.child = None
        self._learn_device(rec)
        rec.pop("versions", None)  # the same for every child: kept once, in the document
        return summarize(rec, self.shape, self.doc.get("peak_flops"))

    def _started(self, proc: subprocess.Popen) -> None:
        self.child = proc

    def _learn_device(self, rec: dict) -> None:
        """Card facts come from the children: the parent never touches CUDA (a context costs memory)."""
        if "device" in self.doc or "device" not in rec:
            return
        device = rec["device"]
        self.doc["device"] = device
        self.doc["card"] = rec.get("card", device)
        self.doc["total_memory_gib"] = rec.get("total_memory_gib")
        self.doc["versions"].update(rec.get("versions") or {})  # the child's torch knows the CUDA version
        self.doc["cuda"] = self.doc["versions"].get("cuda")
        self.doc["peak_flops"] = (
            self.args.peak_tflops * 1e12 if self.args.peak_tflops else peak_flops(self.doc["card"])
        )
        self.doc["timing_claims"] = device == "cuda" and self.args.shape != "tiny"
        if device != "cuda":
            self.doc["cap_gib"] = None  # no cap on the CPU
            self.doc["note"] = "CPU smoke run: checks the code path end to end; its timings mean nothing"

    def add(self, rec: dict) -> None:
        self.doc["results"].append(rec)
        self.doc["results"] = attach_ratios(self.doc["results"])
        self.save()

    def save(self) -> None:
        """Rewrite the document (atomically: a reader, or a killed run, never sees half a file)."""
        if self.out is None:
            if "device" not in self.doc:
                return
            card = "cpu" if self.doc["device"] == "cpu" else self.doc["card"]
            slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
            tag = "-tiny" if self.args.shape == "tiny" else ""
            self.out = Path("benchmarks/results") / f"{self.doc['date'][:10]}-{slug}{tag}.json"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out, self.doc)

    def stop_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(lora_worker.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _wait(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The child's exit code, or None when it ran past `timeout_s` (then it is killed)."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        if (
            proc.poll() is None
        ):  # timed out, or the parent is being stopped: never leave a child holding the GPU
            proc.kill()
            proc.wait()


def run_subprocess(cfg: dict, *, timeout_s: float, on_start: Callable | None = None) -> dict:
    """`bench --one cfg` in a fresh interpreter; its result, or a record of how it failed."""
    cmd = [sys.executable, "-m", CHILD_MODULE, "--one", json.dumps(cfg)]
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), text=True)
        if on_start:
            on_start(proc)
        rc = _wait(proc, timeout_s)
        log.seek(0)
        text = log.read()
    wall = round(time.monotonic() - t0, 1)
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT_MARK):
            rec = json.loads(line[len(RESULT_MARK) :])
            rec["wall_s"] = wall
            return rec
    rec = {
        "recipe": cfg["recipe"],
        "rows": cfg["rows"],
        "seq": cfg["seq"],
        "budget": cfg["rows"] * cfg["seq"],
        "ok": False,
        "oom": False,
        "wall_s": wall,
        "returncode": rc,
        "error": f"timed out after {timeout_s:.0f} s" if rc is None else f"the subprocess exited with {rc}",
        "log_tail": text[-LOG_TAIL_CHARS:],
    }
    if rc is not None and "out of memory" in rec["log_tail"].lower():
        rec["oom"] = True  # e.g. an OOM raised where the child could not catch it
    return rec


def find_max_budget(
    fits: Callable[[int], bool], *, start: int = 8192, granularity: int = 1024, limit: int = 1 << 18
) -> dict:
    """The largest token budget that `fits`: double from `start` until one fails, then bisect.

    `fits(budget)` trains one configuration and says whether it stayed within memory. Budgets
    are multiples of `granularity`; the search stops doubling at `limit` (reported as reached).
    """
    probes: list[dict] = []

    def probe(b: int) -> bool:
        ok = bool(fits(b))
        probes.append({"budget": b, "fits": ok})
        return ok

    lo, hi = 0, None
    b = max(granularity, start // granularity * granularity)
    while b <= limit:
        if probe(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return {"max_budget": lo or None, "limit_reached": True, "probes": probes, "granularity": granularity}
    while hi - lo > granularity:
        mid = lo + (hi - lo) // granularity // 2 * granularity
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return {
        "max_budget": lo or None,
        "first_failing": hi,
        "limit_reached": False,
        "probes": probes,
        "granularity": granularity,
    }
