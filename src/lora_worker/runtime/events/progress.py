"""The job's one source of progress: typed events, one `sequence`, fanned out to every channel.

`Reporter` builds each `ProgressEvent` (validated: a wrong stage or an unknown field raises at
the call), numbers it and hands its JSON to every channel (RunPod `/status`, signed webhooks, test
channels). Within a stage, progress updates are rate-limited (default one per 10 s); a stage
change, the final event and an evaluation result always go out.

Metrics are sent only with the training log record of the event's own `step`, once: the dashboard
inserts one history row per event that carries them. A held-out evaluation at step N waits for
step N's log record and goes out with it (the Trainer runs step-end callbacks, where evaluation
happens, before it logs that step), so the event for step N carries step N's loss and learning
rate; a progress update held back by the rate limit is sent before the next stage event, so the
last step's metrics always reach the dashboard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from lora_worker.runtime.events.event import (
    FINAL_STAGES,
    MAX_MESSAGE_CHARS,
    STAGE_MESSAGES,
    STAGES,
    Evaluation,
    ProgressEvent,
    TrainingMetrics,
    status_of,
)
from lora_worker.runtime.events.runpod_status import RunPodChannel

# RunPodChannel lives in runpod_status; re-exported while job.py still imports it from here.
__all__ = ["STAGES", "Channel", "CostMeter", "Reporter", "RunPodChannel"]

log = logging.getLogger(__name__)

# Fields a stage event may carry for that event only (the rest is the reporter's running state).
STAGE_PAYLOAD = frozenset(
    {
        "message",
        "dataset",
        "plan",
        "model",
        "download",
        "warnings",
        "verdict",
        "lora_artifact_path",
        "error_message",
        "output",
        "resumed_from_step",
    }
)


class Channel(Protocol):
    def send(self, event: Mapping[str, Any], *, kind: str) -> object: ...

    def close(self, timeout_s: float) -> bool: ...


class CostMeter:
    """GPU-seconds of the job and their cost at an hourly rate (USD/hour).

    `already_s` counts earlier attempts of the same job (a resumed job pays for all of them).
    """

    def __init__(
        self, hourly_usd: float, clock: Callable[[], float] = time.monotonic, *, already_s: float = 0.0
    ):
        self.hourly, self.clock, self.t0, self.already_s = hourly_usd, clock, clock(), already_s

    def seconds(self) -> float:
        return self.already_s + self.clock() - self.t0

    def cost(self) -> float:
        return round(self.seconds() / 3600 * self.hourly, 4)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Reporter:
    """Builds progress events and fans them out; `events` keeps every one sent, in order.

    `first_sequence` continues the count of an earlier attempt of the same job, so a receiver that
    ignores non-increasing sequences keeps accepting a resumed job's events.
    """

    def __init__(
        self,
        job_id: str,
        *,
        meter: CostMeter,
        channels: Sequence[Channel],
        min_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = _utc_now,
        first_sequence: int = 1,
    ):
        self.job_id, self.meter, self.channels = job_id, meter, list(channels)
        self.min_interval_s, self.clock, self.now = min_interval_s, clock, now
        self.events: list[ProgressEvent] = []
        self._next_sequence = first_sequence
        self._stage = "queued"
        self._step, self._total_steps, self._tokens_seen = 0, None, None
        self._eta_seconds: float | None = None
        self._evaluation: Evaluation | None = None
        self._eval_waiting = False  # an evaluation waits for its step's log record
        self._held: dict[str, Any] | None = None  # the newest update the rate limit held back
        self._metrics_step: int | None = None  # the step of the newest log record received
        self._finished = False  # the final event went out
        self._last_sent = float("-inf")
        self._lock = threading.RLock()

    @property
    def current_stage(self) -> str:
        return self._stage

    @property
    def status(self) -> str:
        return status_of(self._stage)

    # -------------------------------------------------------------------------------- the API

    def stage(
        self, name: str, *, step: int | None = None, total_steps: int | None = None, **payload: Any
    ) -> ProgressEvent | None:
        """Enter stage `name` and send its event now (the final one for completed/failed/cancelled).

        `payload` takes the event's per-event fields (dataset, plan, model, download, warnings,
        verdict, lora_artifact_path, error_message, output, resumed_from_step, message); anything
        else raises TypeError naming it. After the final event nothing more is sent (None).
        """
        status_of(name)  # ValueError naming the known stages
        unknown = sorted(set(payload) - STAGE_PAYLOAD)
        if unknown:
            raise TypeError(f"stage() got unknown field(s) {unknown}; allowed: {sorted(STAGE_PAYLOAD)}")
        with self._lock:
            if self._finished:
                log.warning("progress: stage %s after the final event, not sent", name)
                return None
            self._flush_held()
            self._stage = name
            self._eta_seconds = None  # a training ETA says nothing about the next stage
            self._eval_waiting = False  # this event carries the evaluation
            self._set(step=step, total_steps=total_steps)
            final = name in FINAL_STAGES
            event = self._emit("final" if final else "stage", payload)
            self._finished = final
            return event

    def progress(
        self,
        *,
        step: int | None = None,
        total_steps: int | None = None,
        metrics: TrainingMetrics | Mapping[str, Any] | None = None,
        tokens_seen: int | None = None,
        eta_seconds: float | None = None,
        download: Mapping[str, Any] | None = None,
        message: str | None = None,
        force: bool = False,
    ) -> ProgressEvent | None:
        """An update within the current stage; sent when `min_interval_s` has passed since the last
        event (or `force`, or a waiting evaluation is due), else held back until the next one.

        `metrics` must be the training log record of `step` itself (loss, learning_rate,
        grad_norm, epoch), or None when this call brings no record of that step.
        """
        record = _metrics(metrics)
        with self._lock:
            if self._finished:
                return None
            self._set(step=step, total_steps=total_steps, tokens_seen=tokens_seen, eta_seconds=eta_seconds)
            if record is not None:
                self._metrics_step = self._step
            else:
                record = self._held_record()  # this step's record, if the rate limit held it back
            update = {"metrics": record, "download": dict(download) if download else None, "message": message}
            due = self._eval_waiting and (record is not None or self._step > self._eval_step())
            if not (force or due) and self.clock() - self._last_sent < self.min_interval_s:
                self._held = update
                return None
            self._held = None
            self._eval_waiting = self._eval_waiting and not due
            return self._emit("progress", update)

    def baseline(self, eval_loss: float | None) -> None:
        """The base model's held-out loss; carried by every later event (the next one sends it)."""
        with self._lock:
            self._evaluation = (self._evaluation or Evaluation()).model_copy(
                update={"eval_loss_before": _finite(eval_loss)}
            )

    def evaluation(self, *, step: int, eval_loss: float | None) -> ProgressEvent | None:
        """A held-out loss measured at optimizer step `step`, sent together with that step's metrics.

        When step `step`'s log record has already arrived, an event goes out now (with the record if
        the rate limit held it back); otherwise with the next `progress` call that brings that
        record or a later step, or with the next stage event.
        """
        with self._lock:
            if self._finished:
                return None
            self._evaluation = (self._evaluation or Evaluation()).model_copy(
                update={"step": step, "eval_loss": _finite(eval_loss)}
            )
            if self._metrics_step is None or self._metrics_step < step:
                self._eval_waiting = True
                return None
            record, self._held = self._held_record(), None
            self._eval_waiting = False
            return self._emit("progress", {"metrics": record})

    def close(self, timeout_s: float = 30.0) -> bool:
        """Drain every channel, bounded in total by `timeout_s`; True when all drained in time."""
        deadline = time.monotonic() + timeout_s
        drained = True
        for ch in self.channels:
            drained = bool(ch.close(max(0.5, deadline - time.monotonic()))) and drained
        return drained

    # -------------------------------------------------------------------------------- internals

    def _eval_step(self) -> int:
        return (self._evaluation.step if self._evaluation else None) or 0

    def _set(self, **values: float | None) -> None:
        for name, value in values.items():
            if value is not None:
                setattr(self, f"_{name}", value)

    def _held_record(self) -> TrainingMetrics | None:
        """The held-back update's training record, if it is the current step's (never relabelled)."""
        if self._held is None or self._metrics_step != self._step:
            return None
        return self._held.get("metrics")

    def _flush_held(self) -> None:
        # A training record the rate limit held back goes out before the stage moves on, so the
        # last step's metrics reach the dashboard's history.
        record, self._held = self._held_record(), None
        if record is not None:
            self._emit("progress", {"metrics": record})

    def _emit(self, kind: str, payload: Mapping[str, Any]) -> ProgressEvent:
        payload = {k: v for k, v in payload.items() if v is not None}
        total = self._total_steps
        percent = min(100.0, round(100.0 * self._step / total, 1)) if total else 0.0
        event = ProgressEvent(
            job_id=self.job_id,
            status=status_of(self._stage),
            stage=self._stage,
            sequence=self._next_sequence,
            timestamp=self.now(),
            message=payload.pop("message", None) or self._default_message(payload),
            step=self._step,
            total_steps=total,
            percent=100.0 if self._stage == "completed" else percent,
            eta_seconds=self._eta_seconds,
            tokens_seen=self._tokens_seen,
            gpu_seconds=round(self.meter.seconds(), 1),
            cost_usd=self.meter.cost(),
            evaluation=self._evaluation,
            **payload,
        )
        self._next_sequence += 1
        self._last_sent = self.clock()
        self.events.append(event)
        wire = event.to_wire()
        for ch in self.channels:
            try:
                ch.send(wire, kind=kind)
            except Exception as err:  # one broken channel must not silence the others
                log.warning("progress channel %s failed: %s", type(ch).__name__, type(err).__name__)
        log.info("progress #%d %s: %s", event.sequence, event.stage, event.message)
        return event

    def _default_message(self, payload: Mapping[str, Any]) -> str:
        error = str(payload.get("error_message") or "").strip()
        if self._stage == "failed" and error:
            return f"failed: {error.splitlines()[0]}"[:MAX_MESSAGE_CHARS]
        if self._stage != "training" or not self._total_steps:
            return STAGE_MESSAGES[self._stage]
        parts = [f"training: step {self._step}/{self._total_steps}"]
        metrics = payload.get("metrics")
        if isinstance(metrics, TrainingMetrics) and metrics.loss is not None:
            parts.append(f"loss {metrics.loss:.4f}")
        ev = self._evaluation
        if ev and ev.step == self._step and ev.eval_loss is not None:
            parts.append(f"held-out loss {ev.eval_loss:.4f}")
        return ", ".join(parts)


def _metrics(value: TrainingMetrics | Mapping[str, Any] | None) -> TrainingMetrics | None:
    metrics = value if isinstance(value, TrainingMetrics) or value is None else TrainingMetrics(**value)
    return None if metrics is None or metrics.is_empty() else metrics


def _finite(value: float | None) -> float | None:
    return Evaluation(eval_loss=value).eval_loss
