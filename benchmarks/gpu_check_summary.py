"""The verdicts of benchmarks/gpu_check.sh: PASS/FAIL per part, read from what the jobs wrote
(result.json, report.json, checkpoints, the NF4 copy on the volume), never from what they were
asked to do; and the output folder a reader gets (summary.txt, summary.json, results.json, logs.txt).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from pathlib import Path
from typing import Any

from lora_worker.runtime.files import atomic_write_json, atomic_write_text, read_json
from lora_worker.runtime.model.layout import marker_problem

JOB_ID = "gpu-check"
NOISE = re.compile(r"FutureWarning|warnings\.warn\(|^\s*\{'(loss|train_runtime|eval_loss)'")
IMPORTANT = re.compile(r"Traceback|Error|error:|out of memory|PASS|FAIL|Killed", re.IGNORECASE)


def trim_log(text: str, *, head: int = 30, tail: int = 80, important: int = 40) -> str:
    """A log cut to what a reader needs: noise lines (deprecation warnings, the Trainer's per-step
    dicts) dropped, then the first `head` and last `tail` lines, with up to `important` lines of
    errors and tracebacks from the part in between."""
    lines = [ln for ln in text.splitlines() if not NOISE.search(ln)]
    if len(lines) <= head + tail:
        return "\n".join(lines)
    middle = lines[head:-tail]
    kept = [ln for ln in middle if IMPORTANT.search(ln)][:important]
    cut = len(middle) - len(kept)
    return "\n".join([*lines[:head], f"... ({cut} lines cut) ...", *kept, *lines[-tail:]])


def newest_complete_step(checkpoints: Path) -> int | None:
    steps = [
        int(m.group(1))
        for p in checkpoints.glob("checkpoint-*/CHECKPOINT_COMPLETE")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name))
    ]
    return max(steps) if steps else None


def nf4_copies(volume: Path) -> list[Path]:
    """The NF4 copies on the volume (never a partial or a moved-aside one)."""
    return sorted(
        p
        for p in volume.glob("models/*/prequantized/*")
        if p.is_dir() and not p.name.startswith(".") and ".corrupt-" not in p.name
    )


def nf4_state(volume: Path) -> dict[str, Any]:
    """Whether a verified NF4 copy exists (every file's size and SHA-256 against its marker)."""
    copies = nf4_copies(volume)
    if not copies:
        return {"present": False}
    copy = copies[-1]
    problem = marker_problem(copy, verify_checksums=True)
    shards = sorted(p.name for p in copy.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in copy.iterdir() if p.is_file())
    return {
        "present": True,
        "path": str(copy),
        "verified": problem is None,
        "problem": problem,
        "shards": len(shards),
        "gb": round(size / 1e9, 3),
    }


# ------------------------------------------------------------------------------------------ checks


def check(name: str, ok: bool | None, detail: Any = None) -> dict[str, Any]:
    """One check: ok True/False, or None when it does not apply here (e.g. CUDA-only on the CPU)."""
    return {"check": name, "ok": ok, "detail": detail}


def verdict(checks: list[dict]) -> str:
    applicable = [c["ok"] for c in checks if c["ok"] is not None]
    if not applicable:
        return "SKIP"
    return "PASS" if all(applicable) else "FAIL"


def optimizer_states(checkpoints: Path) -> dict[str, Any] | None:
    """dtype of each parameter's first optimizer state in the newest checkpoint: uint8 for
    bitsandbytes' 8-bit states (`state1`), float32 for AdamW's `exp_avg`."""
    import torch  # only here: the other steps that import this module never need it

    found = sorted(
        glob.glob(str(checkpoints / "checkpoint-*" / "optimizer.pt")),
        key=lambda p: int(re.findall(r"checkpoint-(\d+)", p)[-1]),
    )
    if not found:
        return None
    try:
        sd = torch.load(found[-1], map_location="cpu", weights_only=True)
    except Exception:  # a state holding non-tensor objects; the file is our own job's
        sd = torch.load(found[-1], map_location="cpu", weights_only=False)
    counts: dict[str, int] = {}
    for state in (sd.get("state") or {}).values():
        first = state.get("state1", state.get("exp_avg"))
        key = str(first.dtype).replace("torch.", "") if isinstance(first, torch.Tensor) else "none"
        counts[key] = counts.get(key, 0) + 1
    return {"file": found[-1], "parameters": sum(counts.values()), "first_state_dtypes": counts}


def part_job(stage: dict, run1: dict, cuda: bool) -> list[dict]:
    nf4 = run1.get("nf4_copy") or {}
    return [
        check(
            "model staged as a RunPod cached model (snapshots/<sha> + refs/main)",
            bool(stage.get("snapshot")),
            stage.get("snapshot"),
        ),
        check(
            "no NF4 copy on the volume before the first run", stage.get("nf4_copy_before_first_run") is False
        ),
        check(
            "the first run quantized on load and saved the NF4 copy (verified against its checksums)",
            bool(nf4.get("present") and nf4.get("verified")),
            nf4,
        ),
        check(
            "the first run trained to a complete checkpoint",
            run1.get("checkpoint_at_kill") is not None,
            run1.get("checkpoints_at_kill"),
        ),
        check(
            "REQUIRE_CUDA=1 set, and the job started on this device",
            os.environ.get("REQUIRE_CUDA", "").strip().lower() in ("1", "true", "yes", "on")
            if cuda
            else None,
            os.environ.get("REQUIRE_CUDA"),
        ),
    ]


def part_kill(run1: dict) -> list[dict]:
    return [
        check(
            "SIGKILL while the job was still running",
            run1.get("killed") is True,
            f"{run1.get('seconds_to_kill')} s after start",
        ),
        check(
            "the process died by SIGKILL (exit 137)", run1.get("returncode") == 137, run1.get("returncode")
        ),
        check("the job had not finished (no result.json)", run1.get("result_written") is False),
    ]


def part_resume(run1: dict, result: dict, report: dict, opt: dict | None, cuda: bool) -> list[dict]:
    m, timings = result.get("metrics") or {}, result.get("timings_s") or {}
    settings = report.get("settings") or {}
    at_kill = run1.get("checkpoint_at_kill")
    dtypes = (opt or {}).get("first_state_dtypes") or {}
    want_optimizer = "paged_adamw_8bit" if cuda else "adamw_torch"
    return [
        check(
            "the resubmission completed",
            result.get("status") == "completed",
            result.get("error_message") or result.get("status"),
        ),
        check(
            "it resumed from the checkpoint at the kill",
            at_kill is not None and result.get("resumed_from_step") == at_kill,
            f"resumed_from_step {result.get('resumed_from_step')}, checkpoint at the kill {at_kill}",
        ),
        check(
            "it loaded the saved NF4 copy (model_load_prequantized, no model_load_quantize)",
            "model_load_prequantized" in timings and "model_load_quantize" not in timings,
            {k: v for k, v in timings.items() if k.startswith("model_")},
        ),
        check(
            "every planned step trained",
            bool(m.get("total_steps"))
            and m.get("steps") == m.get("total_steps")
            and m.get("steps", 0) > (at_kill or 0),
            f"{m.get('steps')}/{m.get('total_steps')}",
        ),
        check(
            "two attempts recorded", len(result.get("attempts") or []) == 2, len(result.get("attempts") or [])
        ),
        check(
            "trained on the device the check runs on",
            settings.get("device") == ("cuda" if cuda else "cpu"),
            f"{settings.get('device')} ({settings.get('gpu')})",
        ),
        check(
            f"optimizer auto resolved to {want_optimizer}",
            settings.get("optimizer_used") == want_optimizer,
            settings.get("optimizer_used"),
        ),
        check(
            "8-bit optimizer states for every LoRA matrix (uint8 in the checkpoint)",
            (bool(dtypes) and set(dtypes) == {"uint8"}) if cuda else None,
            opt,
        ),
        check(
            "Liger kernels on (the job fails when they cannot be applied)",
            settings.get("liger_kernels") == "on" if cuda else None,
            settings.get("liger_kernels"),
        ),
    ]


def part_oom(oom: dict | None, cuda: bool) -> list[dict]:
    if oom is None:
        return [check("the OOM job ran", False, "no record: it did not run or did not finish in time")]
    r, cap = oom.get("result") or {}, oom.get("cap") or {}
    m, rec = r.get("metrics") or {}, r.get("recoveries") or []
    if not cuda:
        return [
            check(
                "a real CUDA OOM needs a GPU",
                None,
                f"ran uncapped on the CPU: {r.get('status')}, {m.get('steps')}/{m.get('total_steps')} steps",
            )
        ]
    ga = [x.get("gradient_accumulation_steps") for x in rec]
    return [
        check("allocator capped once the model was loaded", cap.get("applied") is True, cap),
        check(
            "the job completed under the cap",
            r.get("status") == "completed",
            r.get("error_message") or r.get("status"),
        ),
        check(
            "a real out-of-memory error recovered (result recoveries)",
            bool(rec) and all("memory" in str(x.get("message", "")).lower() for x in rec),
            rec,
        ),
        check(
            "each recovery split the micro-batches (accumulation 1, 2, 4, ...)",
            bool(ga) and ga == [2**i for i in range(len(ga))],
            ga,
        ),
        check(
            "same steps as planned",
            bool(m.get("total_steps")) and m.get("steps") == m.get("total_steps"),
            f"{m.get('steps')}/{m.get('total_steps')}",
        ),
    ]


BENCH_FIELDS = ("tokens_per_s", "median_step_s", "peak_reserved_gib", "mfu", "vs_seed", "memory_vs_seed",
                "optimizer", "liger", "oom", "error")  # fmt: skip
OFFLOAD_FIELDS = ("ok", "oom", "tokens_per_s", "peak_reserved_gib", "host_peak_rss_gib", "error")


def part_bench(doc: dict | None, wanted: list[str], offload: dict | None) -> list[dict]:
    """Every wanted configuration measured (a seed OOM is a result, a project one is not), the
    memory cap held, and on CUDA the optimizers and Liger each recipe should use."""
    if doc is None:
        return [check("the bench ran", False, "no bench JSON")]
    cuda = doc.get("device") == "cuda"
    by_label = {f"{r['recipe']}:{r['rows']}x{r['seq']}": r for r in doc.get("results", [])}
    checks = []
    for label in wanted:
        r = by_label.get(label)
        if r is None:
            checks.append(check(f"{label} measured", False, "not reached"))
            continue
        measured = bool(r.get("ok")) or (bool(r.get("oom")) and label.startswith("seed:"))
        checks.append(check(f"{label} measured (a seed OOM counts as a result)", measured,
                            {k: r.get(k) for k in BENCH_FIELDS}))  # fmt: skip
    cap = doc.get("cap_gib")
    peaks = [r["peak_reserved_gib"] for r in doc.get("results", []) if r.get("peak_reserved_gib")]
    checks.append(check(f"the allocator stayed within the {cap} GiB cap", (max(peaks) <= cap + 0.01)
                        if cuda and cap and peaks else None, max(peaks, default=None)))  # fmt: skip
    want = {"seed": "paged_adamw_32bit", "project": "paged_adamw_8bit"}
    used = {f"{r['recipe']}": r.get("optimizer") for r in doc.get("results", []) if r.get("recipe") in want}
    checks.append(check("optimizers: seed paged_adamw_32bit, project paged_adamw_8bit",
                        used == want if cuda else None, used))  # fmt: skip
    liger = [r.get("liger") for r in doc.get("results", []) if r.get("recipe") == "project"]
    checks.append(check("Liger kernels in the project recipe", all(liger) if cuda and liger else None, liger))
    for r in (offload or {}).get("results", []):
        label = f"{r['recipe']}:{r['rows']}x{r['seq']}"
        checks.append(check(f"{label} (time permitting; not required)", None,
                            {k: r.get(k) for k in OFFLOAD_FIELDS}))  # fmt: skip
    checks.append(check("timing claims (CUDA, real shape)", None, doc.get("timing_claims")))
    return checks


def _job_files(volume: Path) -> tuple[dict, dict]:
    job = volume / "jobs" / JOB_ID
    return read_json(job / "result.json") or {}, read_json(job / "report" / "report.json") or {}


def _part_times(work: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for line in (work / "times.txt").read_text().splitlines() if (work / "times.txt").exists() else []:
        name, seconds, rc, *note = line.split(maxsplit=3)
        out[name] = {"seconds": int(seconds), "exit": rc, "note": note[0] if note else ""}
    return out


def build_summary(work: Path, out: Path, bench_configs: list[str], skip_bench: bool) -> dict[str, Any]:
    device = read_json(work / "device.json") or {}
    cuda = bool(device.get("cuda"))
    stage, run1 = read_json(work / "stage.json") or {}, read_json(work / "run1.json") or {}
    result, report = _job_files(work / "volume")
    opt = optimizer_states(work / "volume" / "jobs" / JOB_ID / "checkpoints")
    times = _part_times(work)
    parts = {
        "job": part_job(stage, run1, cuda),
        "kill": part_kill(run1),
        "resume": part_resume(run1, result, report, opt, cuda),
        "oom": part_oom(read_json(work / "oom.json"), cuda)
        if "oom" in times
        else [
            check(
                "the OOM job ran", None, "skipped: " + (times.get("oom-skipped", {}).get("note") or "not run")
            )
        ],
        "bench": [check("the bench ran", None, "skipped (SKIP_BENCH)")]
        if skip_bench
        else part_bench(
            read_json(out / "bench-70b.json"), bench_configs, read_json(out / "bench-offload.json")
        ),
    }
    summary = {
        "verdict": "PASS" if all(verdict(c) != "FAIL" for c in parts.values()) else "FAIL",
        "parts": {name: {"verdict": verdict(c), "checks": c} for name, c in parts.items()},
        "device": device,
        "times_s": times,
    }
    results = {
        "stage": stage,
        "run1_after_kill": run1,
        "run2_result": result,
        "run2_report_settings": report.get("settings"),
        "optimizer_states": opt,
        "oom": read_json(work / "oom.json"),
    }
    atomic_write_json(out / "summary.json", summary, indent=1)
    atomic_write_json(out / "results.json", results, indent=1)
    atomic_write_text(out / "summary.txt", summary_text(summary))
    atomic_write_text(out / "logs.txt", collect_logs(work / "logs"))
    return summary


PART_TITLES = {
    "job": "(a) the job path: RunPod cached model, quantize on load, NF4 copy saved",
    "kill": "(b) SIGKILL after the first complete checkpoint",
    "resume": "(b) the resubmission: resume on the device, NF4 copy loaded",
    "oom": "(c) a real CUDA out-of-memory error recovered under a cap",
    "bench": "(d) the 70B-shaped bench: seed vs project",
}


def summary_text(summary: dict) -> str:
    d = summary["device"]
    v = d.get("versions") or {}
    lines = [
        f"GPU check: {summary['verdict']}",
        f"device {d.get('device')} ({d.get('total_gib', '-')} GiB); python {d.get('python')}; torch {v.get('torch')} "
        f"(CUDA {d.get('torch_cuda_build')}); transformers {v.get('transformers')}; peft {v.get('peft')}; "
        f"bitsandbytes {v.get('bitsandbytes')}; liger-kernel {v.get('liger-kernel')}; pydantic {v.get('pydantic')}",
    ]
    for line in d.get("unmet_requirements") or []:
        lines.append(f"UNMET requirement: {line}")
    for name, part in summary["parts"].items():
        lines.append("")
        lines.append(f"{part['verdict']:4s}  {PART_TITLES[name]}")
        for c in part["checks"]:
            mark = {True: "ok  ", False: "FAIL", None: "n/a "}[c["ok"]]
            detail = "" if c["detail"] is None else f": {json.dumps(c['detail'], default=str)[:400]}"
            lines.append(f"      [{mark}] {c['check']}{detail}")
    lines.append("")
    lines.append(
        "seconds per part: " + ", ".join(f"{k} {t['seconds']}" for k, t in summary["times_s"].items())
    )
    return "\n".join(lines) + "\n"


def collect_logs(folder: Path) -> str:
    """Every part's log, trimmed, in the order the parts ran."""
    order = ["wheels", "env", "stage", "run1", "run2", "oom", "bench", "offload"]
    logs = sorted(
        folder.glob("*.log"), key=lambda p: (order.index(p.stem) if p.stem in order else 99, p.stem)
    )
    return "\n".join(
        f"===== {p.stem} ({p.stat().st_size} bytes before trimming)\n"
        f"{trim_log(p.read_text(encoding='utf-8', errors='replace'))}\n"
        for p in logs
    )


def cmd_summary(a: argparse.Namespace) -> int:
    configs = [c for c in a.bench_configs.split(",") if c]
    summary = build_summary(Path(a.work), Path(a.out), configs, a.skip_bench)
    print((Path(a.out) / "summary.txt").read_text(), end="")
    return 0 if summary["verdict"] == "PASS" else 1
