"""Progress events: one stream, two channels (RunPod `/status` and signed webhooks), same truth.

Every event gets the next per-job `sequence` number and goes to both channels. Within a stage,
training updates are rate-limited (default one per 10 s); a stage change, an eval result and the
final event always go out. Both channels send from their own background thread, so a slow
receiver never slows training, and both are drained (bounded) before the job returns its result,
so a late progress update can never land after the final result and overwrite it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

STAGES = (
    "queued",
    "preprocessing",
    "model_loading",
    "model_loaded",
    "training",
    "evaluating",
    "uploading",
    "completed",
    "failed",
    "cancelled",
)
FINAL_STAGES = {"completed", "failed", "cancelled"}


class CostMeter:
    """GPU-seconds since the job started and their cost at an hourly rate (USD/hour)."""

    def __init__(self, hourly_usd: float, clock: Callable[[], float] = time.monotonic):
        self.hourly, self.clock, self.t0 = hourly_usd, clock, clock()

    def seconds(self) -> float:
        return self.clock() - self.t0

    def cost(self) -> float:
        return round(self.seconds() / 3600 * self.hourly, 4)


class RunPodChannel:
    """Sends progress to RunPod's job-progress endpoint from one ordered background thread.

    `runpod.serverless.progress_update` starts a new thread per call, so two updates can arrive out
    of order and one can arrive after the job's result, overwriting it in `/status`. This channel
    calls the same SDK send path one update at a time, drops progress that a newer update has
    superseded, and `close()` waits (bounded) for the last send before the result is returned.
    """

    def __init__(self, job: dict, send: Callable[[dict, Any], None] | None = None):
        self.job = job
        self._send = send or _sdk_progress_send
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="runpod-progress", daemon=True)
        self._thread.start()

    def send(self, event: dict, *, kind: str = "progress") -> None:
        # Every event goes to /status; `kind` matters to webhooks (retries), not here.
        self._q.put(event)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            # Only the newest waiting update matters for /status.
            while not self._q.empty():
                nxt = self._q.get()
                if nxt is None:
                    self._deliver(item)
                    return
                item = nxt
            self._deliver(item)

    def _deliver(self, event: dict) -> None:
        try:
            self._send(self.job, event)
        except Exception as err:  # progress is best-effort; the result path is separate
            log.warning("runpod progress update failed: %s", type(err).__name__)

    def close(self, timeout_s: float = 10.0) -> bool:
        self._q.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def _sdk_progress_send(job: dict, event: Any) -> None:
    # The body of runpod.serverless.progress_update's thread, run synchronously on ours.
    from runpod.serverless.modules.rp_progress import _thread_target

    _thread_target(job, event)


class Reporter:
    """Builds progress events and fans them out; the job's single source of progress."""

    def __init__(
        self,
        job_id: str,
        *,
        meter: CostMeter,
        channels: list[Any],
        min_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.job_id, self.meter, self.channels = job_id, meter, channels
        self.min_interval_s, self.clock = min_interval_s, clock
        self.sequence = 0
        self.status = "queued"
        self.last: dict[str, Any] = {
            "step": 0,
            "total_steps": 0,
            "epoch": 0.0,
            "metrics": {},
            "tokens_seen": 0,
        }
        self._last_sent = float("-inf")
        self.events: list[dict] = []  # what was emitted, for result.json and tests
        self._lock = threading.Lock()

    def stage(self, status: str, **fields: Any) -> dict:
        assert status in STAGES, status
        self.status = status
        self.last["eta_seconds"] = None  # a training ETA says nothing about the next stage
        kind = "final" if status in FINAL_STAGES else "stage"
        return self._emit(kind, fields)

    def progress(self, *, force: bool = False, **fields: Any) -> dict | None:
        """A training update; sent when the interval has passed (or `force`), else only recorded."""
        self.last.update({k: v for k, v in fields.items() if k in self.last or k == "eta_seconds"})
        if not force and self.clock() - self._last_sent < self.min_interval_s:
            return None
        return self._emit("progress", fields)

    def _emit(self, kind: str, fields: dict) -> dict:
        with self._lock:
            self.sequence += 1
            self.last.update({k: v for k, v in fields.items() if k in self.last})
            total = self.last.get("total_steps") or 0
            event = {
                "job_id": self.job_id,
                "status": self.status,
                "sequence": self.sequence,
                "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "step": self.last["step"],
                "total_steps": total,
                "epoch": self.last["epoch"],
                "percent": round(100.0 * self.last["step"] / total, 1) if total else 0.0,
                "eta_seconds": fields.get("eta_seconds", self.last.get("eta_seconds")),
                "metrics": self.last["metrics"],
                "tokens_seen": self.last["tokens_seen"],
                "gpu_seconds": round(self.meter.seconds(), 1),
                "cost_usd": self.meter.cost(),
            }
            extra = {k: v for k, v in fields.items() if k not in event and k != "force"}
            event.update(extra)
            if self.status == "completed":
                event["percent"] = 100.0
            self._last_sent = self.clock()
            self.events.append(event)
            for ch in self.channels:
                try:
                    ch.send(event, kind=kind)
                except Exception as err:
                    log.warning("progress channel %s failed: %s", type(ch).__name__, type(err).__name__)
            log.info(
                "progress #%d %s step %s/%s %s",
                self.sequence,
                self.status,
                event["step"],
                total,
                {k: v for k, v in (event["metrics"] or {}).items() if v is not None},
            )
            return event

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain every channel, bounded in total by timeout_s."""
        deadline = time.monotonic() + timeout_s
        for ch in self.channels:
            ch.close(max(0.5, deadline - time.monotonic()))
