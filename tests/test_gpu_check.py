"""The prepared GPU check (benchmarks/gpu_check.sh): its verdicts on CUDA-shaped results, its job
inputs against the real spec, and a CPU dry run of the whole script on tiny shapes.

The dry run goes through every step a GPU run takes (stage a RunPod cached model, the job killed at
its first complete checkpoint, the resubmission, the capped job, the bench, the summary) so that
the one GPU run a session gets is not spent on a typo; what only CUDA can show (8-bit states, Liger,
a real out-of-memory error, timings) is judged by the same checks, fed CUDA-shaped records here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_worker.runtime.spec import parse_job_input

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_summary as summary  # noqa: E402

# The device tool brings back at most 8 files from $OUT, 16 MiB each, named in these characters.
MAX_FILES, MAX_FILE_BYTES, FILE_NAME = 8, 16 * 2**20, re.compile(r"[A-Za-z0-9._-]+")


# ----------------------------------------------------------------------------- job inputs


@pytest.mark.parametrize("oom", [False, True])
def test_the_check_s_job_inputs_are_valid_job_specs(oom):
    doc = gpu_check.job_input("gpu-check", "/data/x.json", rows=4, maxlen=2048, epochs=1, liger="on", oom=oom)
    spec = parse_job_input(doc["input"])
    assert spec.base_model == gpu_check.MODEL_ID and spec.training.optimizer == "auto"
    assert spec.training.liger_kernels == "on" and spec.hyperparameters.gradient_accumulation_steps == 1
    if oom:  # no held-out set: the first out-of-memory error must come from training
        assert spec.evaluation.eval_fraction == 0.0 and spec.output.keep_checkpoints is False
    else:  # the optimizer state is read from the checkpoints after the job
        assert spec.output.keep_checkpoints is True and spec.training.checkpoint_steps == 2


# ----------------------------------------------------------------------------- verdicts on CUDA-shaped records


def _run1(**kw) -> dict:
    nf4 = {"present": True, "verified": True, "shards": 2}
    return {
        "killed": True,
        "returncode": 137,
        "checkpoint_at_kill": 2,
        "result_written": False,
        "nf4_copy": nf4,
        **kw,
    }


def _run2(**kw) -> dict:
    return {
        "status": "completed",
        "resumed_from_step": 2,
        "timings_s": {"model_load_prequantized": 9.1},
        "metrics": {"steps": 11, "total_steps": 11},
        "attempts": [{}, {}],
        **kw,
    }


CUDA_REPORT = {
    "settings": {
        "device": "cuda",
        "gpu": "NVIDIA H200",
        "optimizer_used": "paged_adamw_8bit",
        "liger_kernels": "on",
    }
}
EIGHT_BIT = {"parameters": 28, "first_state_dtypes": {"uint8": 28}}


def test_a_cuda_resume_passes_only_with_its_evidence():
    assert summary.verdict(summary.part_resume(_run1(), _run2(), CUDA_REPORT, EIGHT_BIT, cuda=True)) == "PASS"
    failing = {
        "another checkpoint": _run2(resumed_from_step=4),
        "quantized again": _run2(timings_s={"model_load_quantize": 30.0}),
        "steps missing": _run2(metrics={"steps": 9, "total_steps": 11}),
        "failed": _run2(status="failed", error_message="boom"),
    }
    for why, result in failing.items():
        assert (
            summary.verdict(summary.part_resume(_run1(), result, CUDA_REPORT, EIGHT_BIT, cuda=True)) == "FAIL"
        ), why
    # 32-bit states on CUDA: some LoRA matrix was below bitsandbytes' 8-bit threshold
    mixed = {"parameters": 28, "first_state_dtypes": {"uint8": 24, "float32": 4}}
    assert summary.verdict(summary.part_resume(_run1(), _run2(), CUDA_REPORT, mixed, cuda=True)) == "FAIL"
    # the same result read as a CPU run: the CUDA-only checks do not apply, the device does not match
    checks = summary.part_resume(_run1(), _run2(), CUDA_REPORT, EIGHT_BIT, cuda=False)
    assert [c["check"] for c in checks if c["ok"] is False] == [
        "trained on the device the check runs on",
        "optimizer auto resolved to adamw_torch",
    ]


def test_the_kill_and_the_first_run(monkeypatch):
    assert summary.verdict(summary.part_kill(_run1())) == "PASS"
    assert (
        summary.verdict(summary.part_kill(_run1(killed=False, returncode=0, result_written=True))) == "FAIL"
    )
    stage = {
        "snapshot": "/v/huggingface-cache/hub/models--a--b/snapshots/x",
        "nf4_copy_before_first_run": False,
    }
    monkeypatch.setenv("REQUIRE_CUDA", "1")
    assert summary.verdict(summary.part_job(stage, _run1(), cuda=True)) == "PASS"
    no_copy = _run1(nf4_copy={"present": False})
    assert summary.verdict(summary.part_job(stage, no_copy, cuda=True)) == "FAIL"
    monkeypatch.setenv("REQUIRE_CUDA", "0")  # a GPU run must prove the refusal switch lets it start
    assert summary.verdict(summary.part_job(stage, _run1(), cuda=True)) == "FAIL"


def test_the_oom_part_needs_a_recovered_real_error_and_every_step():
    cap = {"applied": True, "cap_gib": 14.2}
    recoveries = [
        {
            "message": "OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB",
            "gradient_accumulation_steps": 1,
        },
        {
            "message": "OutOfMemoryError: CUDA out of memory. Tried to allocate 896 MiB",
            "gradient_accumulation_steps": 2,
        },
    ]
    ok = {"status": "completed", "recoveries": recoveries, "metrics": {"steps": 3, "total_steps": 3}}
    assert summary.verdict(summary.part_oom({"cap": cap, "result": ok}, cuda=True)) == "PASS"
    no_oom = {**ok, "recoveries": []}  # the cap was too generous: nothing was proven
    assert summary.verdict(summary.part_oom({"cap": cap, "result": no_oom}, cuda=True)) == "FAIL"
    gave_up = {
        "status": "failed",
        "error_message": "out of memory even with one sequence",
        "recoveries": recoveries,
    }
    assert summary.verdict(summary.part_oom({"cap": cap, "result": gave_up}, cuda=True)) == "FAIL"
    assert summary.verdict(summary.part_oom({"cap": cap, "result": ok}, cuda=False)) == "SKIP"
    assert summary.verdict(summary.part_oom(None, cuda=True)) == "FAIL"


def _bench(results: list[dict]) -> dict:
    return {"device": "cuda", "cap_gib": 78.0, "timing_claims": True, "results": results}


def test_the_bench_part():
    def rec(recipe, rows, **kw):
        optim = "paged_adamw_32bit" if recipe == "seed" else "paged_adamw_8bit"
        base = {"recipe": recipe, "rows": rows, "seq": 2048, "ok": True, "tokens_per_s": 1000.0}
        return {**base, "optimizer": optim, "liger": recipe != "seed", "peak_reserved_gib": 50.0, **kw}

    wanted = ["seed:1x2048", "project:1x2048", "seed:4x2048", "project:4x2048"]
    full = [rec("seed", 1), rec("project", 1), rec("seed", 4, ok=False, oom=True), rec("project", 4)]
    assert summary.verdict(summary.part_bench(_bench(full), wanted, None)) == "PASS"  # a seed OOM is a result
    project_oom = [*full[:3], rec("project", 4, ok=False, oom=True)]
    assert summary.verdict(summary.part_bench(_bench(project_oom), wanted, None)) == "FAIL"
    assert summary.verdict(summary.part_bench(_bench(full[:2]), wanted, None)) == "FAIL"  # not reached
    over_cap = [*full[:3], rec("project", 4, peak_reserved_gib=79.5)]
    assert summary.verdict(summary.part_bench(_bench(over_cap), wanted, None)) == "FAIL"
    assert summary.verdict(summary.part_bench(None, wanted, None)) == "FAIL"


def test_trimmed_logs_keep_the_ends_and_the_errors():
    lines = [f"line {i}" for i in range(500)]
    lines[250] = "RuntimeError: CUDA error: out of memory"
    lines[251] = "  warnings.warn("
    lines[300] = "{'loss': 1.0, 'grad_norm': 0.5}"
    text = summary.trim_log("\n".join(lines), head=5, tail=5)
    kept = text.splitlines()
    assert kept[:5] == lines[:5] and kept[-5:] == lines[-5:]
    assert "RuntimeError: CUDA error: out of memory" in kept
    assert "warnings.warn(" not in text and "'loss'" not in text
    assert any(re.fullmatch(r"\.\.\. \(\d+ lines cut\) \.\.\.", k) for k in kept)


# ----------------------------------------------------------------------------- the CPU dry run


def _small_dataset(tmp_path: Path, conversations: int = 5) -> Path:
    """The shipped sample cut to a few conversations: 7 examples at max_seq_length 2048 (7 steps at
    one row per micro-batch), enough for a checkpoint at step 2 and steps after it."""
    doc = json.loads((REPO / "examples" / "brightrun-sample-24.json").read_text())
    doc["conversations"] = doc["conversations"][:conversations]
    meta = doc["training_file_metadata"]
    meta["total_conversations"] = conversations
    meta["total_training_pairs"] = sum(len(c["training_pairs"]) for c in doc["conversations"])
    path = tmp_path / "sample-5.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.e2e
def test_the_gpu_check_dry_run_on_the_cpu(tmp_path):
    """The whole script on the CPU with tiny shapes: the job, the kill and the resume must PASS (the
    NF4 copy saved by the first run and loaded by the second), the capped job runs (its CUDA-only
    verdict is SKIP), the tiny bench runs every recipe, and the output folder holds what a reader
    needs within the device tool's limits."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU dry run; on a GPU run benchmarks/gpu_check.sh itself")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {
        **os.environ,
        "PY": sys.executable,
        "WHEELS": "",  # the venv's own packages
        "REQUIRE_CUDA": "0",
        "LIGER": "auto",
        **{"LAYERS": "2", "HIDDEN": "64", "INTER": "192", "HEADS": "4", "KV": "2", "VOCAB": "1024"},
        **{"MAXLEN": "2048", "ROWS": "1", "EPOCHS": "1"},
        "DATASET": str(_small_dataset(tmp_path)),
        "BENCH_ARGS": "--tiny",
        "BENCH_CONFIGS": "seed:1x64,project:1x64",
        "OFFLOAD_CONFIGS": "project-offload:1x64",
        **{"BENCH_MIN_S": "60", "OFFLOAD_MIN_S": "30", "DEADLINE_S": "1500"},
        "OUT": str(out),
        "WORK": str(work),
    }
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    text = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    doc = json.loads((out / "summary.json").read_text())
    parts = {name: part["verdict"] for name, part in doc["parts"].items()}
    assert parts == {"job": "PASS", "kill": "PASS", "resume": "PASS", "oom": "SKIP", "bench": "PASS"}, text
    assert doc["verdict"] == "PASS" and doc["device"]["device"] == "cpu"

    results = json.loads((out / "results.json").read_text())
    first, second = results["run1_after_kill"], results["run2_result"]
    assert first["killed"] and first["returncode"] == 137 and first["checkpoint_at_kill"] == 2
    assert first["nf4_copy"]["present"] and first["nf4_copy"]["verified"]  # saved by the killed run
    assert (
        "model_load_prequantized" in second["timings_s"] and "model_load_quantize" not in second["timings_s"]
    )
    assert second["resumed_from_step"] == 2 and second["status"] == "completed"
    assert results["oom"]["result"]["status"] == "completed"  # uncapped on the CPU, but the job ran
    assert results["oom"]["cap"]["why_not"] == "no CUDA device"  # the cap saw the training stage begin
    assert results["optimizer_states"]["first_state_dtypes"] == {"float32": 28}  # AdamW on the CPU

    bench = json.loads((out / "bench-70b.json").read_text())
    assert [r["recipe"] for r in bench["results"]] == ["seed", "project"]
    offload = json.loads((out / "bench-offload.json").read_text())
    assert offload["results"][0]["activation_offload"] is True and offload["results"][0]["ok"]

    files = sorted(p for p in out.rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"summary.txt", "summary.json", "results.json", "logs.txt", "console.txt"} <= names
    assert len(files) <= MAX_FILES and all(p.parent == out for p in files)
    assert all(FILE_NAME.fullmatch(p.name) and p.stat().st_size <= MAX_FILE_BYTES for p in files)
    assert "PASS  (a)" in text and "SKIP  (c)" in text
    logs = (out / "logs.txt").read_text()
    for part in ("env", "stage", "run1", "run2", "oom", "bench", "offload"):
        assert f"===== {part} " in logs, part
