"""One complete job on the tiny model, end to end: what it delivers, what it tells the dashboard,
and what a second delivery of the same job id gets."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import LoopbackServer, Recorder, tiny_job
from seed_dashboard import handle_webhook

from lora_worker.runtime.contracts import JobResult, Report
from lora_worker.runtime.events.event import STAGES, STATUSES, ProgressEvent
from lora_worker.runtime.events.webhooks import verify
from lora_worker.runtime.job import run_job
from lora_worker.runtime.settings import Settings

pytestmark = pytest.mark.e2e

SECRET = "whsec_" + "c2VjcmV0LXZhbHVlLWZvci10ZXN0cy0xMjM0NQ=="  # base64 of a test secret
SIGNATURE = "abc123signature"


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def job_run(tiny_model, tmp_path_factory):
    volume = tmp_path_factory.mktemp("volume")
    hooks = LoopbackServer()
    store = LoopbackServer(lambda method, path, headers, body: 200 if path.startswith("/ok/") else 403)
    settings = Settings.from_env(
        {
            "VOLUME_DIR": str(volume),
            "WEBHOOK_SECRET": SECRET,
            "PROGRESS_INTERVAL_S": "0",
            "WANDB_API_KEY": "wandb-key-for-test",
        }
    )
    job = tiny_job(
        tiny_model,
        job_id="11111111-2222-3333-4444-555555555555",  # the dashboard uses its row's UUID as job_id
        webhook_url=f"{hooks.base}/api/training/webhook",
        hyperparameters={"num_epochs": 1},
        output={"upload_url": f"{store.base}/ok/adapter.tar.gz?X-Amz-Signature={SIGNATURE}", "merge": True},
    )
    recorder, capture, root = Recorder(), _Capture(), logging.getLogger()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)  # every record of every library, so the secret checks see them all
    try:
        result = run_job(job, settings=settings, channels=(recorder,))
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
        hooks.close()
        store.close()
    job_dir = volume / "jobs" / job["job_id"]
    return dict(
        result=result, job=job, job_dir=job_dir, settings=settings, hooks=hooks, store=store,
        events=recorder.events, kinds=recorder.kinds, logs=capture.lines,
    )  # fmt: skip


def test_job_completes_learns_and_says_so(job_run):
    result = job_run["result"]
    assert result["status"] == "completed", result
    JobResult.model_validate(result)  # the published contract
    m = result["metrics"]
    assert m["eval_loss_after"] < m["eval_loss_before"] and m["perplexity_after"] < m["perplexity_before"]
    assert result["verdict"] == "improved" and result["outcome"]["interval_95"][1] < 0
    assert m["steps"] == m["total_steps"] > 0 and m["epochs"] == pytest.approx(1.0)
    assert 0 <= m["padding_fraction"] < 0.1  # length-bucketed rows waste little on padding
    stored = json.loads((job_run["job_dir"] / "result.json").read_text())
    assert stored == result
    assert [a["status"] for a in result["attempts"]] == ["completed"]
    assert result["gpu_seconds"] == result["attempts"][0]["seconds"]
    assert any("wandb package is not installed" in w for w in result["warnings"])


def test_report_shows_the_verdict_and_the_curve_from_the_base_model(job_run):
    result, job_dir = job_run["result"], job_run["job_dir"]
    report = Report.model_validate_json((job_dir / "report" / "report.json").read_text())
    assert report.verdict == "improved" and report.headline == result["outcome"]["reason"]
    curve = report.history["eval"]
    assert curve[0] == {"step": 0, "eval_loss": result["metrics"]["eval_loss_before"]}
    assert curve[-1] == {
        "step": result["metrics"]["steps"],
        "eval_loss": result["metrics"]["eval_loss_after"],
    }
    assert (job_dir / "report" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (job_dir / "report" / "report.md").read_text()
    assert f"{result['metrics']['eval_loss_before']:.4f}" in md
    assert len(report.samples) == 2 and all(
        {"base", "adapted", "reference"} <= s.keys() for s in report.samples
    )
    assert report.settings["optimizer_used"] == "adamw_torch" and report.settings["device"] == "cpu"
    assert report.settings["liger_used"] is False  # Liger's kernels need CUDA
    assert list((job_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_adapter_loads_with_peft_and_changes_outputs(job_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(job_run["result"]["lora_artifact_path"])
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "tokenizer_config.json").exists()
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
        after = PeftModel.from_pretrained(base, adapter)(input_ids=x).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_merged_weights_equal_base_plus_adapter(job_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = job_run["result"]
    assert result["merged"]["ok"], result["merged"]
    merged = AutoModelForCausalLM.from_pretrained(result["merged"]["path"], dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, result["lora_artifact_path"])
    x = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        # merged weights are rounded to bf16 once; the PEFT path adds the bf16-rounded delta at run time
        assert torch.allclose(merged(input_ids=x).logits, peft(input_ids=x).logits, atol=5e-2)


def test_archive_is_uploaded_intact_and_the_signature_is_never_echoed(job_run):
    result = job_run["result"]
    archive = Path(result["adapter"]["archive"])
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == result["adapter"]["sha256"]
    (body,) = [r[3] for r in job_run["store"].requests if r[1].startswith("/ok/adapter.tar.gz")]
    assert hashlib.sha256(body).hexdigest() == result["adapter"]["sha256"]
    assert result["uploads"]["presigned"]["ok"]
    assert SIGNATURE not in json.dumps(result)
    assert not any(SIGNATURE in line for line in job_run["logs"])


def test_webhooks_verify_at_arrival_in_order_and_end_with_the_result(job_run):
    result, job_dir = job_run["result"], job_run["job_dir"]
    events = []
    for _, _, headers, body, arrived in job_run["hooks"].requests:
        verify(SECRET, headers, body, now=arrived)  # each signature and timestamp as the receiver saw it
        events.append(json.loads(body))
    for e in events:
        ProgressEvent.model_validate(e)
        assert e["status"] in STATUSES  # the dashboard's CHECK list
    assert [e["sequence"] for e in events] == sorted({e["sequence"] for e in events})
    order = [STAGES.index(e["stage"]) for e in events]
    assert order == sorted(order)
    assert {
        "queued",
        "preprocessing",
        "model_loading",
        "model_loaded",
        "training",
        "evaluating",
        "completed",
    } <= {e["stage"] for e in events}
    final = events[-1]
    assert final["status"] == "completed" and final["percent"] == 100.0
    assert final["lora_artifact_path"] == result["lora_artifact_path"]
    assert final["output"] == json.loads((job_dir / "result.json").read_text())
    trained = [e for e in job_run["events"] if e.get("metrics")]  # the webhooks may skip some (below)
    assert trained and set().union(*(e["metrics"] for e in trained)) <= {
        "loss",
        "learning_rate",
        "grad_norm",
        "epoch",
    }
    # The webhooks carry the job's events in the same order. Every stage and final event arrives;
    # a progress event may be skipped when a newer one already waits behind it (the sender drops
    # superseded progress, so a slow receiver or a busy machine never delays newer state).
    recorded = job_run["events"]
    sent = [e["sequence"] for e in events]
    assert set(sent) <= {e["sequence"] for e in recorded}
    kinds = dict(zip((e["sequence"] for e in recorded), job_run["kinds"], strict=True))
    assert {s for s, kind in kinds.items() if kind != "progress"} <= set(sent)


def test_the_dashboard_stores_every_event_of_the_job(job_run, dashboard_db):
    conn = dashboard_db.conn
    job_id = job_run["job"]["job_id"]
    conn.execute("UPDATE training_jobs SET id = %s WHERE id = %s", (job_id, dashboard_db.job_id))
    bodies = [json.loads(r[3]) for r in job_run["hooks"].requests]
    for payload in bodies:
        handle_webhook(conn, payload)  # raises on any constraint or unknown-column error
    row = conn.execute(
        "SELECT status, lora_artifact_path, current_step, total_steps, completed_at FROM training_jobs WHERE id = %s",
        (job_id,),
    ).fetchone()
    result = job_run["result"]
    assert row[:4] == (
        "completed",
        result["lora_artifact_path"],
        result["metrics"]["steps"],
        result["metrics"]["steps"],
    )
    assert row[4] is not None
    (rows,) = conn.execute(
        "SELECT count(*) FROM training_metrics_history WHERE training_job_id = %s", (job_id,)
    ).fetchone()
    assert rows == sum(1 for b in bodies if b.get("metrics") and b.get("step"))


def test_the_secret_appears_nowhere(job_run):
    raw = SECRET.encode()
    for f in job_run["job_dir"].rglob("*"):
        if f.is_file():
            assert raw not in f.read_bytes(), f
    assert all(raw not in r[3] and SECRET not in json.dumps(r[2]) for r in job_run["hooks"].requests)
    assert job_run["logs"] and not any(SECRET in line for line in job_run["logs"])


def test_a_second_delivery_gets_the_stored_result_and_a_changed_one_is_refused(job_run):
    result, job, job_dir, settings = (
        job_run["result"],
        job_run["job"],
        job_run["job_dir"],
        job_run["settings"],
    )
    stored = (job_dir / "result.json").read_bytes()
    seen = Recorder()
    again = run_job({**job, "webhook_url": None}, settings=settings, channels=(seen,))
    assert again == {**result, "replayed": True}  # nothing retrained
    assert [e["stage"] for e in seen.events] == ["completed"]
    changed = run_job(
        {**job, "webhook_url": None, "hyperparameters": {**job["hyperparameters"], "lora_r": 8}},
        settings=settings,
        channels=(seen,),
    )
    assert changed["status"] == "failed"
    assert "already completed with different input (changed: hyperparameters.lora_r)" in changed["error"]
    assert "its result is kept" in changed["error"]
    assert (job_dir / "result.json").read_bytes() == stored
    assert [e["stage"] for e in seen.events] == ["completed"]  # the refusal sent no event
    assert not (job_dir / "checkpoints").exists() or not list((job_dir / "checkpoints").iterdir())
