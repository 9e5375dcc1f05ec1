"""Worker death: a job killed with SIGKILL resumes from its newest intact checkpoint (a corrupt one is
set aside), ends on the same curve as an uninterrupted run, and counts the time of both attempts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, small_job

from lora_worker.runtime.contracts import Report
from lora_worker.runtime.job import run_job
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.training.checkpoints import COMPLETE_MARKER, step_of

pytestmark = pytest.mark.e2e


def job(tiny_model, small_dataset, job_id: str) -> dict:
    return small_job(
        tiny_model,
        small_dataset,
        job_id=job_id,
        training={"checkpoint_steps": 2, "eval_steps": 1000},
        evaluation={"num_samples": 0},
        output={"keep_checkpoints": True},
    )


def losses(result) -> dict[int, float]:
    report = json.loads(open(result["report"]["json"]).read())
    return {r["step"]: r["loss"] for r in report["history"]["train"]}


def kill_after_checkpoints(spec_file, volume, job_id: str, n: int) -> list[int]:
    """Run the job in a real process and SIGKILL it once `n` checkpoints are complete."""
    env = {**os.environ, "VOLUME_DIR": str(volume)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_worker", "run", str(spec_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = volume / "jobs" / job_id / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while len(list(ckpts.glob(f"checkpoint-*/{COMPLETE_MARKER}"))) < n:
            assert proc.poll() is None, "the job ended before its checkpoints"
            assert time.monotonic() < deadline, "no checkpoints within 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (volume / "jobs" / job_id / "result.json").exists(), "killed after the job had finished"
    return sorted(step_of(p.parent) for p in ckpts.glob(f"checkpoint-*/{COMPLETE_MARKER}"))


def test_sigkill_then_a_corrupt_checkpoint_resumes_from_the_previous_one(tiny_model, small_dataset, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    reference = run_job(job(tiny_model, small_dataset, "ref"), settings=settings)
    assert reference["status"] == "completed", reference

    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": job(tiny_model, small_dataset, "killed")}))
    saved = kill_after_checkpoints(spec, tmp_path, "killed", 2)
    newest, previous = saved[-1], saved[-2]
    # a real fault on the volume: the newest checkpoint's adapter file cut short, its marker intact
    weights = (
        tmp_path / "jobs" / "killed" / "checkpoints" / f"checkpoint-{newest}" / "adapter_model.safetensors"
    )
    weights.write_bytes(weights.read_bytes()[:100])

    resumed = run_job(job(tiny_model, small_dataset, "killed"), settings=settings)
    assert resumed["status"] == "completed", resumed
    assert resumed["resumed_from_step"] == previous
    assert any(f"checkpoint-{newest}" in w and "corrupt" in w for w in resumed["warnings"]), resumed[
        "warnings"
    ]
    aside = list((tmp_path / "jobs" / "killed" / "checkpoints").glob(f"checkpoint-{newest}.corrupt-*"))
    assert aside, "the corrupt checkpoint is kept aside, not deleted"

    assert resumed["metrics"]["steps"] == reference["metrics"]["steps"]
    ref, after = losses(reference), losses(resumed)
    # the curve up to the checkpoint comes from the checkpoint; after it, from the resumed run
    assert sorted(after) == sorted(ref)
    for step, loss in after.items():
        assert loss == pytest.approx(ref[step], abs=2e-3), step
    assert resumed["metrics"]["eval_loss_after"] == pytest.approx(
        reference["metrics"]["eval_loss_after"], abs=2e-3
    )

    # both attempts are counted, and the report says the job was resumed
    first, second = resumed["attempts"]
    assert (first["status"], second["status"]) == ("interrupted", "completed")
    assert first["seconds"] > 0 and second["resumed_from_step"] == previous
    assert resumed["gpu_seconds"] == pytest.approx(first["seconds"] + second["seconds"], abs=0.2)
    report = Report.model_validate_json(open(resumed["report"]["json"]).read())
    assert report.resumed and len(report.attempts) == 2
