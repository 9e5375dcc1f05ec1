"""Worker death: a job killed with SIGKILL after a checkpoint resumes there and ends on the same curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, tiny_job

from lora_worker.runtime.job import run_job
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.training.callbacks import COMPLETE_MARKER

pytestmark = pytest.mark.e2e


def job(tiny_model, job_id: str) -> dict:
    return tiny_job(
        tiny_model,
        job_id=job_id,
        hyperparameters={"gradient_accumulation_steps": 1},
        training={"checkpoint_steps": 3, "eval_steps": 1000},
        evaluation={"num_samples": 0},
    )


def losses(volume, job_id) -> dict[int, float]:
    report = json.loads((volume / "jobs" / job_id / "report" / "report.json").read_text())
    return {r["step"]: r["loss"] for r in report["history"]["train"]}


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    reference = run_job(job(tiny_model, "ref"), settings=settings)
    assert reference["status"] == "completed"

    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": job(tiny_model, "killed")}))
    env = {**os.environ, "VOLUME_DIR": str(tmp_path), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_worker", "run", str(spec)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "jobs" / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while not list(ckpts.glob(f"checkpoint-*/{COMPLETE_MARKER}")):
            assert proc.poll() is None, "the job ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = max(int(p.parent.name.split("-")[1]) for p in ckpts.glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    assert not (tmp_path / "jobs" / "killed" / "result.json").exists()

    resumed = run_job(job(tiny_model, "killed"), settings=settings)
    assert resumed["status"] == "completed"
    assert resumed["resumed_from_step"] == saved
    assert resumed["metrics"]["steps"] == reference["metrics"]["steps"]
    ref, after = losses(tmp_path, "ref"), losses(tmp_path, "killed")
    # the curve up to the checkpoint comes from the checkpoint; after it, from the resumed run
    assert sorted(after) == sorted(ref)
    for step, loss in after.items():
        assert loss == pytest.approx(ref[step], abs=2e-3), step
    assert resumed["metrics"]["eval_loss_after"] == pytest.approx(
        reference["metrics"]["eval_loss_after"], abs=2e-3
    )
