"""Progress events: the typed event, the Reporter's pacing and metrics, and RunPod's /status channel."""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import UTC, datetime

import pytest
from conftest import LoopbackServer
from pydantic import ValidationError

from lora_worker.runtime.events.event import (
    STAGE_STATUS,
    STAGES,
    STATUSES,
    ProgressEvent,
    TrainingMetrics,
    event_json_schema,
)
from lora_worker.runtime.events.progress import CostMeter, Reporter
from lora_worker.runtime.events.runpod_status import RunPodChannel, RunPodTarget, post_progress

T0 = datetime(2025, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """A channel that keeps (kind, wire event) pairs."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, event, *, kind):
        self.sent.append((kind, json.loads(json.dumps(event))))

    def close(self, timeout_s):
        return True

    def events(self) -> list[dict]:
        return [e for _, e in self.sent]


def reporter(clock: Clock | None = None, **kw) -> tuple[Reporter, Recorder]:
    clock = clock or Clock()
    rec = Recorder()
    r = Reporter("job-1", meter=CostMeter(3.6, clock), channels=[rec], clock=clock, now=lambda: T0, **kw)
    return r, rec


def record(step: int) -> dict:
    """A training log record whose numbers name their step (loss 1/step, lr step * 1e-6)."""
    return {"loss": 1.0 / step, "learning_rate": step * 1e-6, "grad_norm": 0.5, "epoch": step / 10}


# ------------------------------------------------------------------------------ the event


def test_every_stage_maps_to_a_dashboard_status_in_job_order():
    assert set(STAGE_STATUS) == set(STAGES)
    assert set(STAGE_STATUS.values()) == set(STATUSES)
    assert STATUSES == (
        "queued",
        "preprocessing",
        "model_loaded",
        "training",
        "completed",
        "failed",
        "cancelled",
    )
    # statuses never go backwards along the stage order
    order = [STATUSES.index(STAGE_STATUS[s]) for s in STAGES if s not in ("failed", "cancelled")]
    assert order == sorted(order)


def test_event_refuses_what_the_dashboard_would_not_store():
    base = {"job_id": "j", "sequence": 1, "timestamp": T0}
    with pytest.raises(ValidationError, match="does not match stage"):
        ProgressEvent(status="training", stage="queued", **base)
    with pytest.raises(ValidationError, match="status"):
        ProgressEvent(status="model_loading", stage="model_loading", **base)
    with pytest.raises(ValidationError, match="eval_loss"):
        ProgressEvent(status="training", stage="training", metrics={"loss": 1.0, "eval_loss": 2.0}, **base)
    with pytest.raises(ValidationError, match="unknown_field"):
        ProgressEvent(status="training", stage="training", unknown_field=1, **base)
    with pytest.raises(ValidationError, match="one line"):
        ProgressEvent(status="training", stage="training", message="two\nlines", **base)
    event = ProgressEvent(status="preprocessing", stage="downloading_model", **base)
    with pytest.raises(ValidationError):
        event.step = 3  # frozen


def test_wire_form_is_strict_json_without_unknowns():
    event = ProgressEvent(
        job_id="j",
        status="training",
        stage="training",
        sequence=4,
        timestamp=T0.replace(microsecond=250_000),
        step=3,
        metrics={"loss": float("nan"), "learning_rate": 2e-5, "grad_norm": float("inf")},
    )
    wire = event.to_wire()
    assert wire["timestamp"] == "2025-01-01T00:00:00.250Z"
    assert wire["metrics"] == {"learning_rate": 2e-5}  # non-finite values are unknown, left out
    assert "total_steps" not in wire and "error_message" not in wire  # None is left out, never null
    json.dumps(wire, allow_nan=False)
    schema = event_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["status"]["enum"] == list(STATUSES)
    assert set(schema["$defs"]["TrainingMetrics"]["properties"]) == {
        "loss",
        "learning_rate",
        "grad_norm",
        "epoch",
    }


# ------------------------------------------------------------------------------ the reporter


def test_progress_is_rate_limited_but_stages_always_go():
    clock = Clock()
    r, rec = reporter(clock, min_interval_s=10)
    r.stage("training", total_steps=100)
    for step in range(1, 30):
        clock.t += 1.0
        r.progress(step=step)
    r.stage("evaluating")
    kinds = [(k, e["stage"], e["step"]) for k, e in rec.sent]
    assert kinds == [
        ("stage", "training", 0),
        ("progress", "training", 10),
        ("progress", "training", 20),
        ("stage", "evaluating", 29),  # the stage event carries the latest step
    ]
    events = rec.events()
    assert [e["sequence"] for e in events] == [1, 2, 3, 4]
    assert events[-1]["status"] == "training" and events[-1]["percent"] == 29.0
    assert events[-1]["gpu_seconds"] == 29.0 and events[-1]["cost_usd"] == pytest.approx(0.029)
    assert [e.to_wire() for e in r.events] == events


def test_eval_step_event_carries_that_steps_metrics_in_the_trainers_order():
    """The Trainer runs step-end callbacks (the evaluation) before it logs the step."""
    clock = Clock()
    r, rec = reporter(clock, min_interval_s=1000)  # nothing goes out on the interval alone
    r.stage("training", total_steps=24)
    r.baseline(3.0)
    for step in range(1, 25):
        clock.t += 1.0
        if step in (12, 24):
            r.evaluation(step=step, eval_loss=2.0 - step / 100)  # on_step_end
        r.progress(step=step, metrics=record(step))  # on_log of the same step
    r.stage("evaluating")
    sent = rec.events()
    evals = [e for k, e in rec.sent if k == "progress" and e.get("evaluation", {}).get("step") == e["step"]]
    assert [e["step"] for e in evals] == [12, 24]
    for e in evals:
        assert e["metrics"] == record(e["step"])  # that step's loss and LR, not the step before
        assert e["evaluation"] == {
            "step": e["step"],
            "eval_loss": 2.0 - e["step"] / 100,
            "eval_loss_before": 3.0,
        }
        assert f"step {e['step']}/24" in e["message"] and "held-out loss" in e["message"]
    # one history row per step at most: no step's metrics are sent twice
    steps_with_metrics = [e["step"] for e in sent if "metrics" in e]
    assert steps_with_metrics == sorted(set(steps_with_metrics))
    assert sent[-1]["stage"] == "evaluating" and "metrics" not in sent[-1]


def test_eval_after_its_log_record_goes_out_at_once_with_the_held_record():
    clock = Clock()
    r, rec = reporter(clock, min_interval_s=1000)
    r.stage("training", total_steps=10)
    r.progress(step=5, metrics=record(5))  # held back by the interval
    event = r.evaluation(step=5, eval_loss=1.5)
    assert event is not None and event.step == 5 and event.metrics == TrainingMetrics(**record(5))
    r.progress(step=5)  # e.g. the Trainer's end-of-training summary: no new record
    r.stage("evaluating")
    assert [e.get("metrics") for e in rec.events()] == [None, record(5), None]


def test_an_evaluation_without_a_log_of_its_step_goes_out_with_the_next_step():
    clock = Clock()
    r, rec = reporter(clock, min_interval_s=1000)
    r.stage("training", total_steps=10)
    assert r.evaluation(step=4, eval_loss=1.5) is None  # logging every 5 steps: no record of step 4
    event = r.progress(step=5, metrics=record(5))
    assert event is not None and event.evaluation.step == 4 and event.metrics.loss == 0.2


def test_a_held_back_record_is_sent_before_the_next_stage():
    clock = Clock()
    r, rec = reporter(clock, min_interval_s=10)
    r.stage("training", total_steps=3)
    for step in (1, 2, 3):
        clock.t += 1
        r.progress(step=step, metrics=record(step))
    r.progress(step=3)  # the summary log: no record of its own
    r.stage("evaluating")
    assert [(e["stage"], e["step"], e.get("metrics")) for e in rec.events()] == [
        ("training", 0, None),
        ("training", 3, record(3)),  # the last step's record reaches the dashboard
        ("evaluating", 3, None),
    ]


def test_stage_payload_and_final_event():
    r, rec = reporter(first_sequence=41)
    with pytest.raises(ValueError, match="known stages"):
        r.stage("model_loading_typo")
    with pytest.raises(TypeError, match="timings_s"):
        r.stage("model_loaded", timings_s={})
    r.stage("preprocessing", dataset={"conversations": 24}, plan={"total_steps": 6}, total_steps=6)
    r.stage("completed", lora_artifact_path="/v/jobs/j/adapter", output={"status": "completed"})
    assert r.stage("failed", error_message="late") is None  # nothing after the final event
    assert r.progress(step=6, force=True) is None
    kinds = [(k, e["status"], e["stage"], e["sequence"]) for k, e in rec.sent]
    assert kinds == [("stage", "preprocessing", "preprocessing", 41), ("final", "completed", "completed", 42)]
    final = rec.events()[-1]
    assert final["percent"] == 100.0 and final["lora_artifact_path"] == "/v/jobs/j/adapter"
    assert final["total_steps"] == 6 and final["output"] == {"status": "completed"}


def test_failed_event_says_why_in_one_line():
    r, rec = reporter()
    r.stage("fetching_dataset")
    r.stage("failed", error_message="dataset_url: HTTP 404\nmore detail")
    final = rec.events()[-1]
    assert (final["status"], final["stage"]) == ("failed", "failed")
    assert final["message"] == "failed: dataset_url: HTTP 404"
    assert final["error_message"] == "dataset_url: HTTP 404\nmore detail"


def test_cost_meter_counts_earlier_attempts():
    clock = Clock()
    meter = CostMeter(3.6, clock, already_s=100.0)
    clock.t = 20.0
    assert meter.seconds() == 120.0 and meter.cost() == pytest.approx(0.12)


def test_a_broken_channel_does_not_silence_the_others():
    class Broken:
        def send(self, event, *, kind):
            raise RuntimeError("down")

        def close(self, timeout_s):
            return True

    rec = Recorder()
    r = Reporter("j", meter=CostMeter(0.0), channels=[Broken(), rec])
    r.stage("queued")
    assert [e["stage"] for e in rec.events()] == ["queued"]


def test_a_real_trainer_evaluates_before_it_logs_the_step(tmp_path):
    """Pins the Trainer's callback order the Reporter relies on, with the reporter wired as a job wires it."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def forward(self, x, y):
            return {"loss": torch.nn.functional.mse_loss(self.w(x).squeeze(-1), y)}

    torch.manual_seed(0)
    data = [{"x": torch.randn(2), "y": torch.tensor(1.0)} for _ in range(8)]
    r, rec = reporter(min_interval_s=1000)
    r.stage("training", total_steps=8)

    class Report(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                r.evaluation(step=state.global_step, eval_loss=0.5)

        def on_log(self, args, state, control, logs=None, **kw):
            last = [h for h in state.log_history if "loss" in h][-1]
            same = last["step"] == state.global_step
            keys = ("loss", "learning_rate", "grad_norm", "epoch")
            r.progress(step=state.global_step, metrics={k: last.get(k) for k in keys} if same else None)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        max_steps=8,
        logging_steps=1,
        learning_rate=0.1,
        warmup_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[Report()])
    trainer.train()
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    (event,) = [e for e in rec.events() if e.get("evaluation", {}).get("step") == 4]
    assert event["step"] == 4
    assert event["metrics"]["loss"] == pytest.approx(logged[4]["loss"])
    assert event["metrics"]["learning_rate"] == pytest.approx(logged[4]["learning_rate"])
    assert logged[4]["learning_rate"] != logged[3]["learning_rate"]  # warmup: each step's LR differs


# ------------------------------------------------------------------------------ RunPod /status


def test_runpod_updates_arrive_in_order_and_none_after_close():
    """A slow, jittery send: superseded updates are skipped, never reordered, and close() waits."""
    rng = random.Random(0)
    arrived: list[int] = []
    lock = threading.Lock()

    def send(job_id, payload, timeout_s):
        time.sleep(rng.uniform(0, 0.01))
        with lock:
            arrived.append(payload["sequence"])

    ch = RunPodChannel({"id": "j"}, send=send)
    for i in range(1, 50):
        ch.send({"sequence": i, "status": "training"})
    ch.send({"sequence": 50, "status": "completed"}, kind="final")
    assert ch.close(timeout_s=10)
    closed_with = list(arrived)
    ch.send({"sequence": 51, "status": "training"})  # too late: refused, never sent
    time.sleep(0.05)
    assert arrived == closed_with
    assert arrived == sorted(arrived) and arrived[-1] == 50


def test_runpod_update_is_retried_then_superseded():
    calls: list[tuple[int, float]] = []
    gate = threading.Event()

    def send(job_id, payload, timeout_s):
        calls.append((payload["sequence"], timeout_s))
        if payload["sequence"] == 1:
            gate.wait(5)
            raise ConnectionError("refused")

    sleeps: list[float] = []
    ch = RunPodChannel({"id": "j"}, send=send, sleep=sleeps.append)
    ch.send({"sequence": 1})
    while not calls:
        time.sleep(0.001)
    ch.send({"sequence": 2})  # waits while 1 fails
    gate.set()
    assert ch.close(timeout_s=10)
    assert [s for s, _ in calls] == [1, 2] and sleeps == []  # 1 is not retried: 2 supersedes it


def test_runpod_close_is_bounded_and_starts_no_attempt_after_its_deadline():
    release = threading.Event()
    calls: list[tuple[int, float]] = []

    def hanging_send(job_id, payload, timeout_s):
        calls.append((payload["sequence"], timeout_s))
        release.wait(timeout_s)  # a request that gets no answer until released or timed out
        raise TimeoutError("read timed out")

    ch = RunPodChannel({"id": "j"}, send=hanging_send, sleep=lambda s: None)
    ch.send({"sequence": 1})
    while not calls:  # the first attempt is in flight
        time.sleep(0.001)
    ch.send({"sequence": 2})
    started = time.monotonic()
    assert ch.close(timeout_s=0.2) is False  # cut off: the in-flight attempt had not ended
    assert time.monotonic() - started < 3
    release.set()
    ch._thread.join(5)
    assert not ch._thread.is_alive()
    assert [seq for seq, _ in calls] == [1]  # nothing was attempted after the deadline


def test_runpod_channel_posts_what_the_platform_expects():
    server = LoopbackServer(lambda method, path, headers, body: 200)
    target = RunPodTarget.from_env(
        {
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{server.base}/job-done/$RUNPOD_POD_ID/$ID?gpu=x",
            "RUNPOD_POD_ID": "pod-7",
            "RUNPOD_AI_API_KEY": "rp-key",
        }
    )
    assert target is not None and "rp-key" not in repr(target)
    ch = RunPodChannel({"id": "job-9"}, target=target)
    ch.send({"sequence": 1, "status": "training", "metrics": {"loss": 1.5}})
    assert ch.close(timeout_s=10)
    ((method, path, headers, body, _arrived),) = server.requests
    server.close()
    assert method == "POST" and path == "/job-done/pod-7/job-9?gpu=x&isStream=false"
    assert headers["authorization"] == "rp-key" and headers["x-request-id"] == "job-9"
    assert json.loads(body) == {
        "status": "IN_PROGRESS",
        "output": {"sequence": 1, "status": "training", "metrics": {"loss": 1.5}},
    }


def test_runpod_channel_is_silent_in_local_test_mode():
    assert RunPodTarget.from_env({}) is None
    ch = RunPodChannel({"id": "j"}, target=None)
    ch.send({"sequence": 1})
    assert ch.close(timeout_s=1)


def test_post_progress_raises_on_an_error_status():
    import requests

    server = LoopbackServer(lambda method, path, headers, body: 500)
    target = RunPodTarget(f"{server.base}/job-done/$ID?x=1", "pod")
    with pytest.raises(requests.HTTPError):
        post_progress(target, "j", {"sequence": 1}, session=requests.Session())
    server.close()
