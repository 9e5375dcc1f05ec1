"""Whole jobs against real faults: lossy data, a model whose weights cannot be fetched, NaN weights,
a corrupt NF4 copy, a second process on the same job id, a full volume, and the SDK's own logging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, LoopbackServer, Recorder, small_job, tmpfs
from data_builders import system_heavy_dataset
from fake_hub import MODEL, FakeHub
from safetensors.torch import load_file, save_file

from lora_worker.runtime.job import run_job
from lora_worker.runtime.model.layout import write_marker
from lora_worker.runtime.settings import Settings

pytestmark = pytest.mark.e2e


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def hub(tiny_model) -> FakeHub:
    """The tiny model on a loopback Hub whose weight files cannot be fetched (HTTP 500)."""
    server = FakeHub()
    files = {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()}
    server.add(MODEL, files)
    for name in files:
        if name.endswith(".safetensors"):
            server.fail[name] = 500
    yield server
    server.close()


def test_lossy_data_is_refused_before_any_weight_and_runs_when_allowed(
    tiny_model, small_dataset, hub, tmp_path
):
    data = tmp_path / "system-heavy.json"
    data.write_text(system_heavy_dataset())
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path / "vol"), "HF_ENDPOINT": hub.url})
    job = small_job(
        tiny_model,
        small_dataset,
        job_id="lossy",
        base_model=MODEL,
        dataset_path=str(data),
        hyperparameters={"max_seq_length": 512},
    )
    refused = run_job(job, settings=settings)
    assert refused["status"] == "failed" and refused["stage"] == "preprocessing"
    assert "that is more than the 20% of target tokens allowed to be lost" in refused["error"]
    assert (
        "raise max_seq_length to" in refused["error"] and "data.max_dropped_target_share" in refused["error"]
    )
    assert hub.weight_requests() == []  # refused on the config and tokenizer alone

    allowed = run_job(
        {
            **job,
            "job_id": "lossy-allowed",
            "base_model": str(tiny_model),
            "data": {"max_dropped_target_share": 1.0},
            "evaluation": {**job["evaluation"], "eval_fraction": 0.3},
            # 600 keeps some targets of every held-out conversation; still two thirds of the tokens lost
            "hyperparameters": {**job["hyperparameters"], "max_seq_length": 600, "learning_rate": 1e-7},
        },
        settings=settings,
    )
    assert allowed["status"] == "completed", allowed
    length = allowed["dataset"]["length"]
    assert length["dropped_targets"] > 0
    assert length["dropped_token_share"] > 0.5
    said = f"{length['dropped_targets']} of {length['targets']} targets dropped at max_seq_length 600"
    assert any(said in w for w in allowed["warnings"]), allowed["warnings"]
    # a learning rate this small moves the adapter, but not the held-out loss: said, not hidden
    assert allowed["verdict"] == "unchanged" and "noise threshold" in allowed["outcome"]["reason"]


def test_a_dry_run_reads_the_config_and_tokenizer_only(tiny_model, small_dataset, hub, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "HF_ENDPOINT": hub.url})
    result = run_job(
        small_job(tiny_model, small_dataset, job_id="dry", base_model=MODEL, dry_run=True), settings=settings
    )
    assert result["status"] == "completed" and result["dry_run"] is True, result
    plan = result["plan"]
    assert plan["total_steps"] > 0 and plan["tokens_to_train"] > 0
    assert {e["gpu"] for e in plan["estimates"]} >= {"H100 SXM", "A100 80GB"}
    assert all(e["seconds"]["total"] > 0 and "estimated" in e["basis"] for e in plan["estimates"])
    assert plan["memory"]["train_peak_gib"] > 0
    assert hub.weight_requests() == []


def test_base_weights_that_give_nan_fail_the_job_clearly(tiny_model, small_dataset, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for p in tiny_model.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (weights,) = broken.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * float("nan")  # a real bad block
    save_file(tensors, weights, metadata={"format": "pt"})

    volume = tmp_path / "vol"
    result = run_job(
        small_job(tiny_model, small_dataset, job_id="nan", base_model=str(broken)),
        settings=Settings.from_env({"VOLUME_DIR": str(volume)}),
    )
    assert result["status"] == "failed"
    assert "non-finite held-out loss before any training" in result["error"]
    assert strict_json((volume / "jobs" / "nan" / "result.json").read_text())["status"] == "failed"


def test_a_corrupt_nf4_copy_is_caught_and_the_model_rebuilt(tiny_model, small_dataset, tmp_path):
    server = FakeHub()
    server.add(MODEL, {p.name: p.read_bytes() for p in tiny_model.iterdir() if p.is_file()})
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "HF_ENDPOINT": server.url})
    job = small_job(tiny_model, small_dataset, base_model=MODEL, evaluation={"num_samples": 0})
    try:
        first = run_job({**job, "job_id": "first"}, settings=settings)
        assert first["status"] == "completed", first
        assert "model_save_prequantized" in first["timings_s"]
        fetched = len(server.requests)
        second = run_job({**job, "job_id": "second"}, settings=settings)
        assert "model_load_prequantized" in second["timings_s"] and len(server.requests) == fetched
        assert second["metrics"]["eval_loss_before"] == first["metrics"]["eval_loss_before"]

        # the copy goes bad in a way its checksums cannot see (rewritten with NaN, marker renewed)
        (copy,) = (tmp_path / "models").glob("*/prequantized/*")
        for shard in copy.glob("*.safetensors"):
            tensors = load_file(shard)
            if "model.norm.weight" in tensors:
                tensors["model.norm.weight"] = tensors["model.norm.weight"] * float("nan")
                save_file(tensors, shard, metadata={"format": "pt"})
        marker = json.loads((copy / ".complete").read_text())
        write_marker(copy, model_id=marker["model_id"], revision=marker["revision"], checksums=True)

        third = run_job({**job, "job_id": "third"}, settings=settings)
    finally:
        server.close()
    assert third["status"] == "completed", third
    assert any("NF4 copy" in w and "non-finite" in w for w in third["warnings"]), third["warnings"]
    assert third["metrics"]["eval_loss_before"] == pytest.approx(
        first["metrics"]["eval_loss_before"], abs=1e-3
    )
    assert list(copy.parent.glob(f"{copy.name}.corrupt-*")), "the bad copy is kept aside"


def test_a_second_process_on_a_running_job_is_refused_and_touches_nothing(
    tiny_model, small_dataset, tmp_path
):
    job = small_job(tiny_model, small_dataset, job_id="busy", hyperparameters={"num_epochs": 3})
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": job}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_worker", "run", str(spec)],
        cwd=REPO,
        env={**os.environ, "VOLUME_DIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    job_dir = tmp_path / "jobs" / "busy"
    deadline = time.monotonic() + 120
    try:
        while not (job_dir / "job_fingerprint.json").exists():  # the first process holds the job
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        seen = Recorder()
        settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "JOB_LOCK_WAIT_S": "1"})
        second = run_job(job, settings=settings, channels=(seen,))
        assert proc.poll() is None, "the first delivery must still be running"
    finally:
        proc.kill()
        proc.wait()
    assert second["status"] == "failed" and "already running elsewhere" in second["error"]
    assert f"pid {proc.pid}" in second["error"]
    assert seen.events == [] and not (job_dir / "result.json").exists()


@pytest.fixture
def small_volume(tmp_path):
    """A real 512 KiB filesystem: room for the job's bookkeeping, not for a checkpoint."""
    with tmpfs(tmp_path / "small", "512k") as mnt:
        yield mnt


def test_a_full_volume_fails_the_job_with_the_numbers_and_a_final_event(
    tiny_model, small_dataset, small_volume
):
    seen = Recorder()
    result = run_job(
        small_job(tiny_model, small_dataset, job_id="full", training={"checkpoint_steps": 1}),
        settings=Settings.from_env({"VOLUME_DIR": str(small_volume)}),
        channels=(seen,),
    )
    assert result["status"] == "failed"
    assert "not enough free space" in result["error"] and " GB" in result["error"]
    assert seen.events[-1]["stage"] == "failed" and seen.events[-1]["error_message"] == result["error"]
    leftovers = [p for p in small_volume.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert leftovers == []


def test_the_sdk_logs_no_job_input_or_signature_in_local_mode(tiny_model, small_dataset, tmp_path):
    store = LoopbackServer()
    job = small_job(
        tiny_model,
        small_dataset,
        job_id="sdk-local",
        evaluation={"num_samples": 0},
        output={"upload_url": f"{store.base}/bucket/a.tar.gz?X-Amz-Signature=feedface0123"},
    )
    try:
        done = subprocess.run(
            [sys.executable, "handler.py", "--test_input", json.dumps({"input": job})],
            cwd=REPO,
            env={
                **{k: v for k, v in os.environ.items() if k != "RUNPOD_LOG_LEVEL"},
                "VOLUME_DIR": str(tmp_path),
            },
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        store.close()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "feedface0123" not in out
    result = json.loads((tmp_path / "jobs" / "sdk-local" / "result.json").read_text())
    assert result["status"] == "completed" and result["uploads"]["presigned"]["ok"]
    assert out.count('"lora_artifact_path"') == 1  # the output is printed once, not by the SDK again


def test_a_job_of_one_optimizer_step_changes_the_models_logits(tiny_model, small_dataset, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_job(
        small_job(
            tiny_model,
            small_dataset,
            job_id="one-step",
            # every micro-batch of the epoch in one optimizer step
            hyperparameters={"gradient_accumulation_steps": 1024, "warmup_ratio": 0.5},
            evaluation={"num_samples": 0},
        ),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "completed", result
    assert result["metrics"]["steps"] == 1
    assert any("only 1 optimizer step" in w for w in result["warnings"]), result["warnings"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        before = base(input_ids=x).logits
        after = PeftModel.from_pretrained(base, result["lora_artifact_path"])(input_ids=x).logits
    assert not torch.allclose(before, after, atol=1e-5)
