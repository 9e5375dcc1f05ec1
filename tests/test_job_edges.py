"""Jobs that end before any model weight is read: bad input, a bad dataset, an early cancel, a
dataset from a URL. Each ends in the one result shape, and none touches a model."""

from __future__ import annotations

import json
import threading

from conftest import SAMPLE, LoopbackServer, Recorder, small_job

from lora_worker.runtime.job import run_job
from lora_worker.runtime.settings import Settings

SECRET = "whsec_" + "c2VjcmV0LXZhbHVlLWZvci10ZXN0cy0xMjM0NQ=="
NO_MODEL = "/nonexistent/base-model"  # any stage that reached for the model would fail on this path


def test_a_webhook_without_a_worker_secret_is_refused(tiny_model, small_dataset, tmp_path):
    result = run_job(
        small_job(tiny_model, small_dataset, job_id="nosecret", webhook_url="https://dash.example.com/hook"),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "failed" and "WEBHOOK_SECRET" in result["error"]
    assert json.loads((tmp_path / "jobs" / "nosecret" / "result.json").read_text()) == result


def test_an_unusable_webhook_secret_is_a_clear_error_that_never_echoes_it(
    tiny_model, small_dataset, tmp_path
):
    result = run_job(
        small_job(tiny_model, small_dataset, job_id="badsecret", webhook_url="https://dash.example.com/hook"),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path), "WEBHOOK_SECRET": "whsec_not*base64!"}),
    )
    assert result["error"].startswith("invalid job input:\n  - WEBHOOK_SECRET:")
    assert "not*base64" not in json.dumps(result)


def test_invalid_input_with_a_known_job_id_is_recorded_and_sent_to_the_webhook(tmp_path):
    hooks = LoopbackServer()
    try:
        result = run_job(
            {"job_id": "bad-input", "webhook_url": f"{hooks.base}/hook", "hyperparameters": {"lora_r": 0}},
            settings=Settings.from_env({"VOLUME_DIR": str(tmp_path), "WEBHOOK_SECRET": SECRET}),
        )
    finally:
        hooks.close()
    assert result["status"] == "failed" and result["job_id"] == "bad-input"
    assert "hyperparameters.lora_r: Input should be greater than or equal to 1" in result["error"]
    assert "dataset_url, dataset_path: give exactly one of them" in result["error"]
    assert json.loads((tmp_path / "jobs" / "bad-input" / "result.json").read_text()) == result
    (final,) = [json.loads(r[3]) for r in hooks.requests]
    assert final["status"] == "failed" and final["error_message"] == result["error"]


def test_a_bad_dataset_fails_before_the_model_is_looked_for(tiny_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"conversations": [{"conversation_metadata": {"conversation_id": "c9"}, "training_pairs": '
        '[{"turn_number": 1, "current_user_input": "hi", "target_response": 7}]}]}'
    )
    seen = Recorder()
    result = run_job(
        {"job_id": "bad", "dataset_path": str(bad), "base_model": NO_MODEL},
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
        channels=(seen,),
    )
    assert result["status"] == "failed" and result["stage"] == "fetching_dataset"
    assert "conversation c9 turn 1: target_response: must be a string or null" in result["error"]
    assert "resolving_model" not in [e["stage"] for e in seen.events]


def test_a_cancel_before_training_stops_at_the_next_stage(tiny_model, small_dataset, tmp_path):
    cancel = threading.Event()
    cancel.set()
    result = run_job(
        small_job(tiny_model, small_dataset, job_id="early"),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
        cancel=cancel,
    )
    assert result["status"] == "cancelled"
    assert result["message"] == "cancelled during fetching_dataset, before any checkpoint"
    assert "model_load_quantize" not in result["timings_s"]


def test_a_dataset_from_a_url_and_a_missing_one(tiny_model, small_dataset, tmp_path):
    data = SAMPLE.read_bytes()
    server = LoopbackServer(
        lambda m, path, h, b: (200, data) if path.startswith("/exports/br.json?") else (404, b"no")
    )
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    job = small_job(tiny_model, small_dataset, job_id="url", dry_run=True)
    del job["dataset_path"]
    try:
        ok = run_job({**job, "dataset_url": f"{server.base}/exports/br.json?token=abc"}, settings=settings)
        missing = run_job(
            {**job, "job_id": "url2", "dataset_url": f"{server.base}/gone.json?token=abc"}, settings=settings
        )
    finally:
        server.close()
    assert ok["status"] == "completed" and ok["dataset"]["pairs"] == 156
    assert (tmp_path / "jobs" / "url" / "dataset" / "br.json").read_bytes() == data
    assert missing["status"] == "failed" and missing["error"].startswith("dataset_url:")
    assert "404" in missing["error"] and "token=abc" not in json.dumps(missing)


def test_require_cuda_on_a_machine_without_a_gpu_fails_at_once_naming_the_cause(
    tiny_model, small_dataset, tmp_path
):
    seen = Recorder()
    result = run_job(
        small_job(tiny_model, small_dataset, job_id="nogpu"),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path), "REQUIRE_CUDA": "1"}),
        channels=(seen,),
    )
    assert result["status"] == "failed" and result["error"].startswith(
        "REQUIRE_CUDA is set but no usable CUDA GPU"
    )
    assert "driver" in result["error"] or "CPU wheel" in result["error"]
    assert result["timings_s"].get("dataset_fetch") is None  # before anything was fetched
    assert [e["stage"] for e in seen.events] == ["failed"]
