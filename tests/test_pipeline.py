"""CPU end-to-end jobs on the tiny model: the whole story, with webhooks, and what it delivers."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch
from conftest import LoopbackServer, tiny_job

from lora_worker.runtime.events.progress import STAGES
from lora_worker.runtime.events.webhooks import verify
from lora_worker.runtime.job import Hooks, run_job
from lora_worker.runtime.settings import Settings

pytestmark = pytest.mark.e2e

SECRET = "whsec_" + "c2VjcmV0LXZhbHVlLWZvci10ZXN0cy0xMjM0NQ=="  # base64 of a test secret


@pytest.fixture(scope="module")
def job_run(tiny_model, tmp_path_factory):
    volume = tmp_path_factory.mktemp("volume")
    rx = LoopbackServer()
    rx.url = f"{rx.base}/api/training/webhook"
    settings = Settings.from_env(
        {"VOLUME_DIR": str(volume), "WEBHOOK_SECRET": SECRET, "PROGRESS_INTERVAL_S": "0"}
    )
    handler, root = _Capture(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # every record of every library, so the secret check sees them all
    try:
        result = run_job(tiny_job(tiny_model, job_id="e2e-1", webhook_url=rx.url), settings=settings)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        rx.close()
    return result, volume / "jobs" / "e2e-1", rx, handler.lines


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_job_completes_and_held_out_loss_falls(job_run):
    result, job_dir, _, _ = job_run
    assert result["status"] == "completed", result
    m = result["metrics"]
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["perplexity_after"] < m["perplexity_before"]
    assert m["steps"] > 0 and m["epochs"] == pytest.approx(2.0)
    assert 0 <= m["padding_fraction"] < 0.1  # length-bucketed rows waste little on padding
    assert json.loads((job_dir / "result.json").read_text()) == json.loads(json.dumps(result, default=str))


def test_report_shows_before_and_after(job_run):
    result, job_dir, _, _ = job_run
    report = json.loads((job_dir / "report" / "report.json").read_text())
    assert report["metrics"]["eval_loss_before"] == result["metrics"]["eval_loss_before"]
    curve = report["history"]["eval"]
    assert curve[0] == {"step": 0, "eval_loss": result["metrics"]["eval_loss_before"]}
    assert curve[-1] == {
        "step": result["metrics"]["steps"],
        "eval_loss": result["metrics"]["eval_loss_after"],
    }
    md = (job_dir / "report" / "report.md").read_text()
    assert f"{result['metrics']['eval_loss_before']:.4f}"[:5] in md
    assert (job_dir / "report" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["samples"]) == 2 and all(
        {"base", "adapted", "reference"} <= s.keys() for s in report["samples"]
    )
    assert list((job_dir / "tensorboard").rglob("events.out.tfevents.*"))
    used = report["settings"]
    assert (used["optimizer_used"], used["liger_used"], used["device"]) == ("adamw_torch", False, "cpu")


def test_adapter_loads_with_peft_and_changes_outputs(job_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, job_dir, _, _ = job_run
    adapter = Path(result["lora_artifact_path"])
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer_config.json").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        before = base(input_ids=x).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        after = tuned(input_ids=x).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_archive_checksum(job_run):
    import hashlib

    result, _, _, _ = job_run
    arc = Path(result["adapter"]["archive"])
    assert hashlib.sha256(arc.read_bytes()).hexdigest() == result["adapter"]["sha256"]
    assert arc.stat().st_size == result["adapter"]["size_bytes"]


def test_webhooks_verify_in_order_and_end_with_the_result(job_run):
    result, job_dir, rx, _ = job_run
    events = []
    for _, _, headers, body in rx.requests:
        verify(SECRET, headers, body)  # raises if either signature or the timestamp is wrong
        events.append(json.loads(body))
    seqs = [e["sequence"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    order = [STAGES.index(e["status"]) for e in events]
    assert order == sorted(order)
    assert {
        "queued",
        "preprocessing",
        "model_loading",
        "model_loaded",
        "training",
        "evaluating",
        "completed",
    } <= {e["status"] for e in events}
    final = events[-1]
    assert final["status"] == "completed" and final["percent"] == 100.0
    assert final["lora_artifact_path"] == result["lora_artifact_path"]
    assert final["output"] == json.loads((job_dir / "result.json").read_text())
    training = [e for e in events if e["status"] == "training" and e["step"] > 0]
    assert training and all(e["total_steps"] == result["metrics"]["steps"] for e in training)
    assert any(e["metrics"].get("loss") is not None for e in training)


def test_secret_appears_nowhere(job_run):
    _, job_dir, rx, logs = job_run
    raw = SECRET.encode()
    for f in job_dir.rglob("*"):
        if f.is_file():
            assert raw not in f.read_bytes(), f
    assert all(raw not in body and raw.decode() not in json.dumps(h) for _, _, h, body in rx.requests)
    assert logs and not any(SECRET in line for line in logs)


def test_webhook_without_secret_is_refused(tiny_model, tmp_path):
    result = run_job(
        tiny_job(tiny_model, job_id="nosecret", webhook_url="https://dash.example.com/hook"),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "failed" and "WEBHOOK_SECRET" in result["error"]
    assert not (tmp_path / "jobs" / "nosecret").exists()  # refused before any work


def test_bad_dataset_fails_before_loading_the_model(tiny_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"conversations": [{"conversation_metadata": {"conversation_id": "c9"}, "training_pairs": '
        '[{"turn_number": 1, "current_user_input": "hi", "target_response": 7}]}]}'
    )
    result = run_job(
        tiny_job(tiny_model, job_id="bad", dataset_path=str(bad)),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "failed"
    assert "conversation c9 turn 1: target_response: must be a string or null" in result["error"]
    assert "model_load" not in result["timings_s"]


def _losses(result) -> dict[int, float]:
    report = json.loads(Path(result["report"]["json"]).read_text())
    return {r["step"]: r["loss"] for r in report["history"]["train"]}


def test_oom_splits_micro_batches_and_trains_the_same_steps(tiny_model, tmp_path):
    """After an OOM each optimizer step still sees the same examples: same steps, same loss curve."""
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    job = tiny_job(
        tiny_model,
        hyperparameters={"num_epochs": 1},
        training={"checkpoint_steps": 100},
        evaluation={"num_samples": 0},
    )
    reference = run_job({**job, "job_id": "no-oom"}, settings=settings)
    # micro-batches hold up to 4 x 1024 tokens; refuse anything above 2,100 (the first one over it OOMs)
    result = run_job({**job, "job_id": "oom"}, settings=settings, hooks=Hooks(inject_oom_above_tokens=2100))
    assert result["status"] == "completed", result
    (rec,) = result["recoveries"]
    assert rec["event"] == "out_of_memory" and rec["max_rows"] == 4 and rec["micro_batch_tokens"] > 2100
    assert result["metrics"]["steps"] == reference["metrics"]["steps"]
    ref, got = _losses(reference), _losses(result)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-2), step
    assert result["metrics"]["eval_loss_after"] == pytest.approx(
        reference["metrics"]["eval_loss_after"], abs=1e-2
    )


def test_oom_at_the_smallest_budget_fails_clearly(tiny_model, tmp_path):
    import re

    result = run_job(
        tiny_job(tiny_model, job_id="oom2", hyperparameters={"num_epochs": 1}),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
        hooks=Hooks(inject_oom_above_tokens=16),
    )
    assert result["status"] == "failed"
    assert re.search(
        r"out of memory even with one sequence per micro-batch; "
        r"tried \d+ tokens x 4 rows, \d+ tokens x 2 rows, \d+ tokens x 1 rows\. Lower",
        result["error"],
    ), result["error"]


class CancelAt:
    """A progress channel that presses /cancel once training reaches a step."""

    def __init__(self, event: threading.Event, step: int):
        self.event, self.step, self.seen = event, step, []

    def send(self, event, *, kind):
        self.seen.append(event)
        if event["status"] == "training" and event["step"] >= self.step:
            self.event.set()

    def close(self, timeout_s):
        return True


def test_cancel_stops_within_a_step_then_resubmission_resumes(tiny_model, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path), "PROGRESS_INTERVAL_S": "0"})
    cancel = threading.Event()
    spy = CancelAt(cancel, step=2)
    job = tiny_job(tiny_model, job_id="cancel-me", training={"checkpoint_steps": 100})
    result = run_job(job, settings=settings, cancel=cancel, hooks=Hooks(channels=[spy]))
    assert result["status"] == "cancelled"
    steps = [e["step"] for e in spy.seen if e["status"] == "training"]
    assert max(steps) <= 3  # stopped within one optimizer step of the cancel
    assert spy.seen[-1]["status"] == "cancelled"
    ckpts = sorted((tmp_path / "jobs" / "cancel-me" / "checkpoints").glob("checkpoint-*/CHECKPOINT_COMPLETE"))
    assert ckpts, "a cancelled job leaves a checkpoint"
    again = run_job(job, settings=settings)
    assert again["status"] == "completed"
    assert again["resumed_from_step"] == int(ckpts[-1].parent.name.split("-")[1])


def test_time_limit_stops_with_checkpoint(tiny_model, tmp_path):
    result = run_job(
        tiny_job(tiny_model, job_id="slow", max_duration_hours=0.0001),  # 0.36 s
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "failed"
    assert "time limit" in result["error"] and "resubmitting the same job_id resumes it" in result["error"]
    assert list((tmp_path / "jobs" / "slow" / "checkpoints").glob("checkpoint-*/CHECKPOINT_COMPLETE"))


def test_dry_run_trains_nothing(tiny_model, tmp_path):
    result = run_job(
        tiny_job(tiny_model, job_id="dry", dry_run=True),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "completed" and result["dry_run"] is True
    assert result["plan"]["total_steps"] > 0 and result["dataset"]["pairs"] == 156
    assert not (tmp_path / "jobs" / "dry" / "checkpoints").exists()


def test_merge_writes_plain_weights_equal_to_base_plus_adapter(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_job(
        tiny_job(
            tiny_model,
            job_id="merge",
            hyperparameters={"num_epochs": 1},
            output={"merge": True},
            evaluation={"num_samples": 0},
        ),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path), "WANDB_API_KEY": "wandb-key-for-test"}),
    )
    assert result["status"] == "completed" and result["merged"]["ok"], result
    assert any("wandb package is not installed" in w for w in result["warnings"])
    merged = AutoModelForCausalLM.from_pretrained(result["merged"]["path"], dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, result["lora_artifact_path"])
    x = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        # merged weights are rounded to bf16 once; the PEFT path adds the bf16-rounded delta at run time
        assert torch.allclose(merged(input_ids=x).logits, peft(input_ids=x).logits, atol=5e-2)


def test_merge_refusal_is_clear():
    from lora_worker.runtime.model.load import merge_problem

    assert merge_problem(10 * 10**9, ram_bytes=100 * 10**9, disk_bytes=100 * 10**9) is None
    msg = merge_problem(141 * 10**9, ram_bytes=120 * 10**9, disk_bytes=500 * 10**9)
    assert msg.startswith("output.merge refused: needs about 155.1 GB of free RAM, 120.0 GB available")
    assert "adapter itself is saved" in msg


def test_packed_mode_trains(tiny_model, tmp_path):
    result = run_job(
        tiny_job(
            tiny_model,
            job_id="packed",
            hyperparameters={"num_epochs": 1},
            training={"packing": "packed"},
            evaluation={"num_samples": 0},
        ),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "completed", result
    assert result["metrics"]["padding_fraction"] == 0.0
    assert result["metrics"]["eval_loss_after"] < result["metrics"]["eval_loss_before"]


@pytest.fixture(scope="module")
def put_server():
    # accepts PUTs under /ok/, refuses the rest with 403 like an expired presigned URL
    s = LoopbackServer(lambda method, path, headers, body: 200 if path.startswith("/ok/") else 403)
    yield s
    s.close()


def test_upload_to_a_presigned_url(tiny_model, tmp_path, put_server):
    import hashlib

    url = f"{put_server.base}/ok/adapter.tar.gz?X-Amz-Signature=abc123"
    result = run_job(
        tiny_job(
            tiny_model,
            job_id="up",
            hyperparameters={"num_epochs": 1},
            output={"upload_url": url},
            evaluation={"num_samples": 0},
        ),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "completed" and result["uploads"]["presigned"]["ok"], result
    (body,) = [b for m, p, _, b in put_server.requests if p.startswith("/ok/adapter.tar.gz")]
    assert hashlib.sha256(body).hexdigest() == result["adapter"]["sha256"]
    assert "abc123" not in json.dumps(result)  # the URL's signature is not echoed into the output


def test_failed_upload_keeps_the_adapter_and_says_where(tiny_model, tmp_path, put_server):
    url = f"{put_server.base}/expired/adapter.tar.gz?X-Amz-Signature=abc123"
    result = run_job(
        tiny_job(
            tiny_model,
            job_id="up-fail",
            hyperparameters={"num_epochs": 1},
            output={"upload_url": url},
            evaluation={"num_samples": 0},
        ),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "completed"
    up = result["uploads"]["presigned"]
    assert up["ok"] is False and up["attempts"] == 1 and "403" in up["error"]
    (warning,) = result["warnings"]
    assert warning.startswith("upload to presigned failed") and result["lora_artifact_path"] in warning
    assert (Path(result["lora_artifact_path"]) / "adapter_model.safetensors").exists()
    assert Path(result["adapter"]["archive"]).exists()


def test_dataset_from_a_url(tiny_model, tmp_path):
    from conftest import SAMPLE

    data = SAMPLE.read_bytes()
    server = LoopbackServer(
        lambda m, path, h, b: (200, data) if path.startswith("/exports/br.json?") else (404, b"no")
    )
    try:
        job = tiny_job(tiny_model, job_id="url", dry_run=True)
        del job["dataset_path"]
        ok = run_job(
            {**job, "dataset_url": f"{server.base}/exports/br.json?token=abc"},
            settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
        )
        assert ok["status"] == "completed" and ok["dataset"]["pairs"] == 156
        assert (tmp_path / "jobs" / "url" / "dataset" / "br.json").read_bytes() == data
        missing = run_job(
            {**job, "job_id": "url2", "dataset_url": f"{server.base}/gone.json?token=abc"},
            settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
        )
        assert missing["status"] == "failed"
        assert missing["error"].startswith("dataset_url: download failed: HTTPError: 404")
        assert "token=abc" not in missing["error"]
    finally:
        server.close()


def test_cancel_before_training_stops_at_the_next_stage(tiny_model, tmp_path):
    cancel = threading.Event()
    cancel.set()
    result = run_job(
        tiny_job(tiny_model, job_id="early"),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
        cancel=cancel,
    )
    assert result["status"] == "cancelled"
    assert result["message"] == "cancelled during preprocessing, before any checkpoint"
    assert "model_load_quantize" not in result["timings_s"]


def test_a_cancel_on_the_last_step_does_not_undo_a_finished_job():
    from types import SimpleNamespace

    from lora_worker.runtime.training.callbacks import StopCallback

    cancel = threading.Event()
    cancel.set()
    stop = StopCallback(cancel, max_seconds=1.0, max_cost_usd=None, hourly_usd=0.0, elapsed=lambda: 10.0)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    stop.on_step_end(None, SimpleNamespace(global_step=24, max_steps=24), control)
    assert stop.reason is None and not control.should_training_stop
    stop.on_step_end(None, SimpleNamespace(global_step=23, max_steps=24), control)
    assert stop.reason == "cancelled" and control.should_training_stop and control.should_save


def test_resubmitting_a_job_id(tiny_model, tmp_path):
    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    job = tiny_job(
        tiny_model, job_id="again", hyperparameters={"num_epochs": 1}, evaluation={"num_samples": 0}
    )
    first = run_job(job, settings=settings)
    assert first["status"] == "completed"
    # the same job again (RunPod may deliver it twice): the stored result, nothing retrained,
    # and neither the model nor the tokenized dataset is touched on the way
    seen: list[dict] = []
    spy = type("Spy", (), {"send": lambda self, e, kind: seen.append(e), "close": lambda self, t: True})()
    assert run_job(job, settings=settings, hooks=Hooks(channels=[spy])) == first
    assert [e["status"] for e in seen] == ["queued", "preprocessing", "completed"]
    assert not any("dataset" in e for e in seen)
    # a different job under the same id: refused before any model is loaded, naming what changed
    changed = run_job({**job, "hyperparameters": {**job["hyperparameters"], "lora_r": 8}}, settings=settings)
    assert changed["status"] == "failed"
    assert (
        "already has checkpoints from a different job (changed: hyperparameters.lora_r)" in changed["error"]
    )
    assert "model_load_quantize" not in changed["timings_s"]


def test_unusable_webhook_secret_is_a_clear_error(tiny_model, tmp_path):
    result = run_job(
        tiny_job(tiny_model, job_id="badsecret", webhook_url="https://dash.example.com/hook"),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path), "WEBHOOK_SECRET": "whsec_not*base64!"}),
    )
    assert result["status"] == "failed" and result["error"].startswith(
        "invalid job input:\n  - WEBHOOK_SECRET:"
    )
    assert "not*base64" not in result["error"]
