"""One configuration, measured in this process (the bench runs each in a fresh subprocess).

Build the NF4 model, make the recipe's Trainer, train `steps` optimizer steps and record the
median step time after the first (warm-up) step, the rates it gives and the peak memory. An
out-of-memory is a result (`"oom": true`), any other failure a record with its traceback's tail.
"""

from __future__ import annotations

import gc
import resource
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lora_worker.tools.bench.nf4_model import build_nf4_model
from lora_worker.tools.bench.recipes import StepClock, make_trainer
from lora_worker.tools.bench.record import installed_versions, step_stats
from lora_worker.tools.bench.shapes import Shape

GIB = 2**30
CPU_MAX_PARAMS = 2e9  # largest shape (matmul parameters) the CPU is allowed to build


def is_oom(err: BaseException) -> bool:
    """Both forms CUDA reports it in: torch.OutOfMemoryError and a RuntimeError naming it."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _device_record(cfg: dict) -> dict[str, Any]:
    """The record's header: which config, on which device; applies the memory cap on CUDA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rec: dict[str, Any] = {
        "recipe": cfg["recipe"],
        "rows": cfg["rows"],
        "seq": cfg["seq"],
        "budget": cfg["rows"] * cfg["seq"],
        "steps": cfg["steps"],
        "device": device,
        "ok": False,
        "oom": False,
        "card": "cpu",
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        rec["card"] = torch.cuda.get_device_name(0)
        rec["total_memory_gib"] = round(props.total_memory / GIB, 2)
        if cfg.get("cap_gib"):
            fraction = min(1.0, cfg["cap_gib"] * GIB / props.total_memory)
            torch.cuda.set_per_process_memory_fraction(fraction)
            rec["memory_fraction"] = round(fraction, 4)
    rec["versions"] = {**installed_versions(), "cuda": torch.version.cuda}
    return rec


def _train(rec: dict, cfg: dict, shape: Shape, workdir: Path, phase: list[str]) -> None:
    """Build, prepare and train, filling `rec`; `phase[0]` says where a failure happened."""
    device = rec["device"]
    t0 = time.perf_counter()
    model = build_nf4_model(shape, device, seed=cfg["seed"], max_positions=cfg["seq"])
    if device == "cuda":
        torch.cuda.synchronize()
        rec["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    phase[0] = "prepare"
    clock = StepClock(device)
    trainer, info = make_trainer(model, cfg, device, workdir, clock)
    rec.update(info)
    rec["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    rec["optimizer"] = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak from here on includes the weights
    phase[0] = "train"
    out = trainer.train()
    opt = trainer.optimizer
    rec["optimizer_class"] = type(getattr(opt, "optimizer", opt)).__name__
    rec["train_loss"] = round(float(out.training_loss), 4)
    rec.update(step_stats(clock.steps, clock.ends, rec["tokens_per_step"]))
    rec["ok"] = rec.get("tokens_per_s", 0) > 0
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        rec["device_used_gib"] = round((total - free) / GIB, 2)  # incl. CUDA context and paged state


def run_one(cfg: dict) -> dict:
    """One configuration, in this process: build, prepare, train `steps` steps, measure."""
    rec = _device_record(cfg)
    shape = Shape(**cfg["shape"])
    if rec["device"] == "cpu" and shape.matmul_params() > CPU_MAX_PARAMS:
        # 70B in NF4 is ~36 GiB of host memory, and hours per step: never on the CPU by mistake.
        rec["error"] = (
            f"the {shape.matmul_params() / 1e9:.1f}B-parameter shape needs a GPU; use --tiny on the CPU"
        )
        rec["failed_phase"] = "build"
        return rec
    phase = ["build"]
    workdir = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    try:
        _train(rec, cfg, shape, workdir, phase)
    except Exception as err:
        if is_oom(err):
            rec["oom"] = True
            rec["oom_message"] = str(err)[:300]
        else:
            rec["error"] = f"{type(err).__name__}: {err}"[:800]
            rec["traceback_tail"] = traceback.format_exc()[-2000:]
        rec["failed_phase"] = phase[0]
    finally:
        if rec["device"] == "cuda":
            rec["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        # Host memory: what activation offload moves off the card lands here (Linux: ru_maxrss in KiB).
        rec["host_peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)
        shutil.rmtree(workdir, ignore_errors=True)
    return rec
