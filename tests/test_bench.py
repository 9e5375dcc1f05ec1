"""The benchmark tool: its arithmetic, its search, its failure records, and a tiny CPU run end to end.

The CPU run checks that both recipes go through the real code path (NF4 build, `add_lora`,
`build_trainer`, the seed recipe, one subprocess per config, the JSON); it makes no timing claims.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lora_worker.runtime.gpu_rates import GPU_RATES
from lora_worker.tools.bench import child, cli, runner
from lora_worker.tools.bench.projection import project_seconds
from lora_worker.tools.bench.record import attach_ratios, step_stats
from lora_worker.tools.bench.runner import find_max_budget
from lora_worker.tools.bench.shapes import SHAPES, RunSpec, mfu, parse_runs, peak_flops, plan_runs

# ----------------------------------------------------------------------------- FLOPs and MFU


def test_70b_flops_per_token_is_the_issue_count():
    shape = SHAPES["70b"]
    assert shape.matmul_params() == pytest.approx(69.5e9, rel=1e-3)
    assert shape.flops_per_token() == pytest.approx(417e9, rel=1e-3)


def test_mfu_against_dense_bf16_peak():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None
    # 1,000 tokens/s x 417 GFLOP = 417 TFLOP/s = 42% of 989 TFLOP/s
    assert mfu(1000.0, 417e9, 989e12) == pytest.approx(0.4216, abs=1e-4)
    assert mfu(1000.0, 417e9, None) is None
    assert mfu(0.0, 417e9, 989e12) is None


def test_step_stats_drop_the_warm_up_step():
    out = step_stats([9.0, 2.0, 2.2, 1.8], [10.0, 12.0, 14.2, 16.0], 2048)
    assert out["median_step_s"] == 2.0
    assert out["tokens_per_s"] == 1024.0
    assert out["tokens_per_s_wall"] == pytest.approx(2048 / 2.0, rel=1e-6)


# ----------------------------------------------------------------------------- configurations


def test_grid_puts_the_seed_first_at_each_budget_and_caps_rows():
    specs = plan_runs(["project", "seed"], [8192, 2048], [1, 4], seed_seq=2048)
    assert [s.label for s in specs] == [
        "seed:1x2048",
        "project:1x2048",  # rows 4 at 2048 would be 512-token rows: capped to 1
        "seed:4x2048",
        "project:1x8192",
        "project:4x2048",
    ]
    assert parse_runs("seed:1x2048, project:4x2048") == [
        RunSpec("seed", 1, 2048),
        RunSpec("project", 4, 2048),
    ]
    with pytest.raises(ValueError):
        parse_runs("project:2048")


def test_the_offload_recipe_is_a_config_of_its_own():
    assert parse_runs("project-offload:1x32768,project:1x32768") == [
        RunSpec("project-offload", 1, 32768),
        RunSpec("project", 1, 32768),
    ]
    with pytest.raises(ValueError, match="project-offload"):  # the message lists the recipes
        parse_runs("offload:1x2048")
    specs = plan_runs(["seed", "project", "project-offload"], [8192], [1], seed_seq=2048)
    assert [s.label for s in specs] == ["seed:4x2048", "project:1x8192", "project-offload:1x8192"]


def test_ratios_to_the_seed_at_the_same_budget():
    results = [
        {"recipe": "seed", "budget": 2048, "tokens_per_s": 800.0, "peak_reserved_gib": 50.0},
        {"recipe": "project", "budget": 2048, "tokens_per_s": 1200.0, "peak_reserved_gib": 37.5},
        {"recipe": "seed", "budget": 16384, "oom": True},
        {"recipe": "project", "budget": 16384, "tokens_per_s": 1300.0, "peak_reserved_gib": 60.0},
        {"recipe": "project", "budget": 32768, "oom": True},
        {"recipe": "project-offload", "budget": 2048, "tokens_per_s": 1000.0, "peak_reserved_gib": 30.0},
    ]
    out = attach_ratios(results)
    assert out[1]["vs_seed"] == 1.5 and out[1]["memory_vs_seed"] == 0.75
    assert out[3]["vs_seed"] is None and out[3]["seed_at_budget"] == "out of memory"
    assert out[4]["seed_at_budget"] == "not measured"
    assert out[5]["vs_seed"] == 1.25 and out[5]["memory_vs_seed"] == 0.6


# ----------------------------------------------------------------------------- largest budget


def test_max_budget_search_doubles_then_bisects_to_the_granularity():
    calls = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= 45_000  # out of memory above 45,000 tokens

    out = find_max_budget(fits, start=8192, granularity=1024)
    assert out["max_budget"] == 44032  # the largest multiple of 1024 <= 45,000
    assert out["first_failing"] == 45056
    assert calls[:4] == [8192, 16384, 32768, 65536]  # doubling until the first OOM
    assert all(b % 1024 == 0 for b in calls)
    assert len(calls) <= 4 + 5  # then log2(32768 / 1024) bisection steps
    assert [p["fits"] for p in out["probes"]] == [b <= 45_000 for b in calls]


class _FakeRunner:
    """Stands in for the subprocess layer: 'fits' below a budget, out of memory above."""

    def __init__(self, fits_below: int):
        self.fits_below, self.doc, self.specs = fits_below, {}, []

    def run(self, spec: RunSpec, steps: int | None = None) -> dict:
        self.specs.append(spec)
        ok = spec.budget <= self.fits_below
        return {"recipe": spec.recipe, "budget": spec.budget, "ok": ok, "oom": not ok}

    def add(self, rec: dict) -> None:
        self.doc.setdefault("results", []).append(rec)


def test_the_search_probes_the_offload_recipe_when_asked(capsys):
    fake = _FakeRunner(fits_below=20_000)
    a = cli.build_parser().parse_args(["--find-max-budget", "--search-recipe", "project-offload"])
    cli._search(fake, a)
    assert {s.recipe for s in fake.specs} == {"project-offload"} and {s.rows for s in fake.specs} == {1}
    assert fake.doc["max_budget"]["recipe"] == "project-offload"
    assert fake.doc["max_budget"]["max_budget"] == 19456 and fake.doc["search_recipe"] == "project-offload"
    assert "project-offload" in capsys.readouterr().out
    assert cli.build_parser().parse_args(["--find-max-budget"]).search_recipe == "project"
    with pytest.raises(SystemExit):  # the seed recipe is never searched
        cli.build_parser().parse_args(["--search-recipe", "seed"])


def test_max_budget_search_edges():
    assert find_max_budget(lambda b: b <= 5000)["max_budget"] == 4096  # below the start
    assert find_max_budget(lambda b: False)["max_budget"] is None  # not even the smallest
    out = find_max_budget(lambda b: True, limit=1 << 16)
    assert out["max_budget"] == 65536 and out["limit_reached"]


# ----------------------------------------------------------------------------- projection


def test_job_projection_arithmetic():
    p = project_seconds(600_000, 3, 1500.0, None)  # 1.8M tokens at 1,500 tok/s
    assert p["train_seconds"] == 1200.0 and p["train_minutes"] == 20.0
    assert p["total_minutes"] is None  # load time unknown: reported apart, not guessed
    assert p["meets_20_min_target"]
    assert p["vs_seed_estimate"] == "30x to 45x shorter than 10-15 h"
    p = project_seconds(600_000, 3, 1500.0, 300.0)
    assert p["total_minutes"] == 25.0 and not p["meets_20_min_target"]


def test_project_job_on_the_sample_dataset(capsys):
    sample = Path(__file__).resolve().parents[1] / "examples" / "brightrun-sample-24.json"
    assert cli.main(["--project-job", "--dataset", str(sample), "--tokens-per-s", "1000"]) == 0
    doc = json.loads(capsys.readouterr().out)
    side = doc["dataset_side"]
    assert (
        side["padded_tokens_per_epoch"] >= side["tokens_per_epoch"] > side["trainable_tokens_per_epoch"] > 0
    )
    p = doc["projections"]["given"]
    assert p["train_seconds"] == pytest.approx(side["padded_tokens_per_epoch"] * 3 / 1000.0, abs=0.1)
    assert any("tiny offline tokenizer" in n for n in doc["notes"])


def test_project_job_without_a_rate_uses_the_per_gpu_table(capsys):
    sample = Path(__file__).resolve().parents[1] / "examples" / "brightrun-sample-24.json"
    assert cli.main(["--project-job", "--dataset", str(sample)]) == 0
    doc = json.loads(capsys.readouterr().out)
    padded = doc["dataset_side"]["padded_tokens_per_epoch"]
    eighty = {g.label: g for g in GPU_RATES if g.memory_gb >= 80}
    assert set(doc["projections"]) == set(eighty)  # every card that holds a 70B job, no smaller one
    for label, p in doc["projections"].items():
        gpu = eighty[label]
        assert p["basis"] == gpu.basis == "estimated" and p["source"] == gpu.source
        assert p["train_seconds"] == pytest.approx(padded * 3 / gpu.tokens_per_s, abs=0.1)
    # The A100's lower bf16 peak makes the same job about 3x longer than on the H100 SXM.
    ratio = doc["projections"]["A100 80GB"]["train_seconds"] / doc["projections"]["H100 SXM"]["train_seconds"]
    assert ratio == pytest.approx(989 / 312, rel=0.01)


def test_project_job_off_the_table_shape_says_so(capsys):
    sample = Path(__file__).resolve().parents[1] / "examples" / "brightrun-sample-24.json"
    assert cli.main(["--project-job", "--dataset", str(sample), "--max-seq-length", "1024"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any("4 x 2048" in n for n in doc["notes"])


def test_the_default_memory_cap_stands_for_an_80_gb_h100():
    assert cli.build_parser().parse_args([]).cap_gib == 78.0


def test_the_parent_process_never_imports_bitsandbytes():
    """bitsandbytes opens a CUDA context on import; the parent must leave the GPU to its children."""
    code = (
        "import sys; import lora_worker.tools.bench.cli, lora_worker.tools.bench.runner; "
        "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))"
    )
    src = str(Path(cli.__file__).resolve().parents[3])
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": src},
        check=True,
    )
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- failure records


def _fake_python(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_a_crashed_child_is_recorded_with_its_output(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "echo 'Segmentation fault' >&2; exit 139"))
    cfg = {"recipe": "project", "rows": 1, "seq": 2048}
    rec = runner.run_subprocess(cfg, timeout_s=30)
    assert rec["ok"] is False and rec["oom"] is False
    assert rec["returncode"] == 139 and "Segmentation fault" in rec["log_tail"]


def test_an_uncaught_oom_in_the_child_is_still_an_oom(tmp_path, monkeypatch):
    body = "echo 'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB'; exit 1"
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, body))
    rec = runner.run_subprocess({"recipe": "seed", "rows": 4, "seq": 2048}, timeout_s=30)
    assert rec["oom"] is True and rec["budget"] == 8192


def _tiny_cfg(**kw) -> dict:
    from dataclasses import asdict

    cfg = {"recipe": "project", "rows": 1, "seq": 64, "steps": 2, "shape": asdict(SHAPES["tiny"])}
    cfg.update({"cap_gib": None, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "seed": 0})
    return {**cfg, "label_fraction": 0.5, **kw}


def test_out_of_memory_inside_a_run_is_a_result_not_a_crash(monkeypatch):
    import torch

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.75 GiB")

    monkeypatch.setattr(child, "build_nf4_model", oom)
    rec = child.run_one(_tiny_cfg())
    assert rec["oom"] is True and rec["ok"] is False and rec["failed_phase"] == "build"
    assert "error" not in rec and "1.75 GiB" in rec["oom_message"]

    def broken(*a, **k):
        raise ValueError("some other failure")

    monkeypatch.setattr(child, "build_nf4_model", broken)
    rec = child.run_one(_tiny_cfg())
    assert rec["oom"] is False and "ValueError: some other failure" in rec["error"]
    assert "Traceback" in rec["traceback_tail"]


def test_the_offload_recipe_moves_saved_activations_to_the_host(monkeypatch):
    """project-offload trains through the job's own offload hooks: every decoder forward of the
    training steps enters torch's save_on_cpu; the plain project recipe never does."""
    import torch

    entered = []
    real = torch.autograd.graph.save_on_cpu

    def counting(*args, **kwargs):
        entered.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", counting)
    rec = child.run_one(_tiny_cfg(recipe="project"))
    assert rec["ok"], rec
    assert rec["activation_offload"] is False and entered == []
    rec = child.run_one(_tiny_cfg(recipe="project-offload"))
    assert rec["ok"], rec
    assert rec["activation_offload"] is True
    assert len(entered) == 2  # one decoder forward per step (2 steps); recomputation runs outside
    assert rec["host_peak_rss_gib"] > 0


def test_the_70b_shape_is_refused_on_the_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only guard")
    rec = child.run_one(_tiny_cfg(shape={**SHAPES["70b"].__dict__}))
    assert rec["ok"] is False and "needs a GPU" in rec["error"]


def test_a_hung_child_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "exec sleep 30"))
    rec = runner.run_subprocess({"recipe": "seed", "rows": 1, "seq": 2048}, timeout_s=1)
    assert rec["returncode"] is None and "timed out" in rec["error"]


# ----------------------------------------------------------------------------- the tiny run, end to end


@pytest.mark.e2e
def test_tiny_bench_end_to_end_on_the_cpu(tmp_path):
    """Every recipe, two budgets, one subprocess each, through the real training path."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU smoke test; tests marked gpu cover CUDA")
    out = tmp_path / "tiny.json"
    argv = [
        "--tiny",
        "--configs",
        "seed:1x64,project:1x64,project:2x64,packed:2x64,project-offload:1x64",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["device"] == "cpu" and doc["timing_claims"] is False
    assert {r["recipe"] for r in doc["results"]} == {"project", "packed", "seed", "project-offload"}
    assert {r["budget"] for r in doc["results"]} == {64, 128}
    for r in doc["results"]:
        assert r.get("tokens_per_s", 0) > 0 or r.get("oom"), r
    for name in ("torch", "transformers", "peft", "bitsandbytes", "python"):
        assert doc["versions"][name], name
    seed, project = doc["results"][0], doc["results"][1]
    # No CUDA: the project resolves "auto" to AdamW; the seed recipe falls back from paged 32-bit AdamW.
    assert project["optimizer"] == "adamw_torch" and project["liger"] is False
    assert project["upcast_fp32"] is False and seed["upcast_fp32"] is True
    assert "needs CUDA" in seed["optimizer_note"]
    assert project["labelled_tokens_per_step"] == 32  # assistant-like labels on the second half
    assert project["vs_seed"] is not None  # measured against the seed at the same budget, same run
    # Offload changes where saved activations live, not what is computed: the same loss.
    offload = doc["results"][-1]
    assert offload["activation_offload"] is True and project["activation_offload"] is False
    assert offload["train_loss"] == pytest.approx(project["train_loss"], rel=1e-6)
    assert offload["vs_seed"] is not None
    assert doc["command"][:4] == ["python", "-m", "lora_worker", "bench"]


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_two_layer_70b_width_on_cuda_records_peak_memory(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "gpu.json"
    argv = ["--shape", "70b", "--layers", "2", "--configs", "seed:1x2048,project:1x2048", "--steps", "3"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cuda" and doc["timing_claims"] is True and doc["versions"]["cuda"]
    for r in doc["results"]:
        assert r["ok"], r
        assert r["peak_alloc_gib"] > 0 and r["peak_reserved_gib"] >= r["peak_alloc_gib"]
        assert r["mfu"] is None or 0 < r["mfu"] < 1
    seed, project = doc["results"]
    assert seed["optimizer"] == "paged_adamw_32bit" and project["optimizer"] == "paged_adamw_8bit"
    assert project["memory_vs_seed"] is not None and project["memory_vs_seed"] < 1.0  # no fp32 up-cast
    if os.environ.get("EXPECT_LIGER"):
        assert project["liger"] is True
