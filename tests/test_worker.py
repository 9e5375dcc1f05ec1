"""The RunPod handler: /cancel reaches training, which checkpoints, reports and re-raises."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import tiny_job

from lora_worker.runtime import handler as worker
from lora_worker.runtime.settings import Settings

pytestmark = pytest.mark.e2e


def long_job(tiny_model):
    """Long enough to be cancelled mid-training; no checkpoint on schedule, so any is the cancel's."""
    return tiny_job(
        tiny_model,
        hyperparameters={"num_epochs": 5, "gradient_accumulation_steps": 1},
        training={"checkpoint_steps": 1000},
        evaluation={"num_samples": 0},
    )


async def start_training(job: dict, job_dir) -> asyncio.Task:
    """The handler as the SDK runs it, returned once its Trainer has started (bounded wait)."""
    task = asyncio.ensure_future(worker.handler(job))
    deadline = time.monotonic() + 300
    while not (job_dir / "tensorboard").exists():
        assert not task.done(), task.result()
        assert time.monotonic() < deadline, "training did not start within 300 s"
        await asyncio.sleep(0.05)
    return task


def test_task_cancel_stops_training_then_reraises(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(worker, "_settings", Settings.from_env({"VOLUME_DIR": str(tmp_path)}))
    job = {"id": "rp-123", "input": long_job(tiny_model)}
    job_dir = tmp_path / "jobs" / "rp-123"

    async def scenario():
        task = await start_training(job, job_dir)
        await asyncio.sleep(0.5)
        task.cancel()  # what the SDK does on /cancel
        with pytest.raises(asyncio.CancelledError):
            await task
        # by the time the cancellation propagates, the job has wound down
        return json.loads((job_dir / "result.json").read_text())

    result = asyncio.run(scenario())
    assert result["status"] == "cancelled" and result["job_id"] == "rp-123"
    assert list((job_dir / "checkpoints").glob("checkpoint-*/CHECKPOINT_COMPLETE"))


def test_bad_input_is_a_readable_error_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(worker, "_settings", Settings.from_env({"VOLUME_DIR": str(tmp_path)}))
    out = asyncio.run(worker.handler({"id": "rp-1", "input": {"hyperparameters": {"lora_r": 0}}}))
    assert "hyperparameters.lora_r: Input should be greater than or equal to 1" in out["error"]
    assert "dataset_url, dataset_path: give exactly one of them" in out["error"]
    assert "Traceback" not in out["error"]


def test_a_second_cancel_does_not_cut_the_wind_down_short(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(worker, "_settings", Settings.from_env({"VOLUME_DIR": str(tmp_path)}))
    job = {"id": "rp-twice", "input": long_job(tiny_model)}
    job_dir = tmp_path / "jobs" / "rp-twice"

    async def scenario():
        task = await start_training(job, job_dir)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()  # e.g. /cancel and the execution timeout both fire
        with pytest.raises(asyncio.CancelledError):
            await task
        return (job_dir / "result.json").exists()

    assert asyncio.run(scenario()), "the handler returned before the job had wound down"
