"""A job's folder on the volume: one writer at a time, what a resubmission may reuse, what stays.

RunPod may deliver one job twice, a dashboard may resubmit a job id, and a worker may die
mid-job. The rules:

- One process writes a job folder: the per-job lock is the model cache's volume lock (owner
  record, heartbeat, stale locks broken). A second delivery waits long enough for a dead
  holder's lock to go stale (so a redelivery after a worker death resumes), and is otherwise
  refused with the holder's name; a refused delivery writes nothing into the folder.
- A job id only resumes the same job: the fingerprint (everything that decides the trained
  weights) must match the stored one. A completed job's result is immutable: the same input
  gets the stored result back, a different input is refused without touching it.
- Every attempt's time is recorded as it goes (attempts.json), so cost counts all attempts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lora_worker.runtime.contracts import Attempt
from lora_worker.runtime.files import atomic_write_json, read_json
from lora_worker.runtime.spec import JobSpec
from lora_worker.runtime.volume_lock import LockTimeoutError, VolumeLock

LOCK_NAME = ".job.lock"


class JobRefused(RuntimeError):
    """This delivery may not run: another process holds the job, or its input differs from the
    stored job. Nothing in the job folder is touched, and no webhook is sent for it (the dashboard
    would otherwise mark the real job failed): the refusal goes only to the request that carried it."""


@dataclass(frozen=True)
class JobPaths:
    root: Path
    job_id: str

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "job_fingerprint.json"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def archive(self) -> Path:
        return self.root / f"{self.job_id}-adapter.tar.gz"


@contextlib.contextmanager
def claim(paths: JobPaths, *, wait_s: float, stale_s: float) -> Iterator[VolumeLock]:
    """Hold the job's lock for the whole attempt, or raise JobRefused naming the holder."""
    paths.root.mkdir(parents=True, exist_ok=True)
    lock = VolumeLock(
        paths.root / LOCK_NAME, timeout_s=wait_s, stale_lock_s=stale_s, purpose=f"job {paths.job_id}"
    )
    try:
        lock.acquire()
    except LockTimeoutError as err:
        raise JobRefused(
            f"job_id {paths.job_id!r} is already running elsewhere ({err}); this delivery was refused "
            "and the running job is untouched"
        ) from None
    try:
        yield lock
    finally:
        lock.release()


def fingerprint(spec: JobSpec, dataset_sha256: str) -> dict[str, Any]:
    """What decides the trained weights: a checkpoint only resumes a job with the same values."""
    training = spec.training.model_dump(exclude={"checkpoint_steps", "checkpoint_minutes", "logging_steps"})
    return {
        "base_model": spec.base_model,
        "base_model_revision": spec.base_model_revision,
        "init_adapter": spec.init_adapter,
        "dataset_sha256": dataset_sha256,
        "dataset_format": spec.dataset_format,
        "data": spec.data.model_dump(),
        "hyperparameters": spec.hyperparameters.model_dump(),
        "training": training,
        "evaluation": spec.evaluation.model_dump(include={"eval_fraction", "max_eval_conversations"}),
    }


def changed_keys(a: dict, b: dict) -> list[str]:
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def stored_result(paths: JobPaths) -> dict | None:
    """The stored result when this job already completed (a dry run does not count)."""
    previous = read_json(paths.result)
    if isinstance(previous, dict) and previous.get("status") == "completed" and not previous.get("dry_run"):
        return previous
    return None


def check_resubmission(paths: JobPaths, fp: dict, *, has_checkpoint: bool) -> dict | None:
    """Decide what this delivery may reuse; returns the stored result of a completed identical job.

    Raises JobRefused when the folder holds a different job (completed, or with checkpoints).
    Otherwise records the fingerprint, so a later delivery can be compared with this one.
    """
    stored_fp = read_json(paths.fingerprint)
    completed = stored_result(paths)
    changed = changed_keys(fp, stored_fp) if isinstance(stored_fp, dict) else []
    if completed is not None:
        if changed:
            raise JobRefused(
                f"job_id {paths.job_id!r} already completed with different input (changed: "
                f"{', '.join(changed)}); its result is kept as it was. Use a new job_id to train with "
                "this input."
            )
        return completed
    if has_checkpoint and changed:
        raise JobRefused(
            f"job_id {paths.job_id!r} has checkpoints from a different job (changed: {', '.join(changed)}); "
            "resubmit with the original input to resume it, or use a new job_id"
        )
    atomic_write_json(paths.fingerprint, fp)
    return None


class AttemptLog:
    """This attempt's time and cost, kept in attempts.json as the job runs.

    `record()` rewrites this attempt's entry; it is called on every progress event, so a worker
    killed mid-job has its time counted up to its last event. `total_*` add the earlier attempts.
    """

    def __init__(
        self,
        paths: JobPaths,
        *,
        hourly_usd: float,
        gpu: str,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path, self.hourly, self.gpu, self.clock = paths.attempts, hourly_usd, gpu, clock
        self.t0 = clock()
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.previous = _read_attempts(paths.attempts)
        self.resumed_from_step: int | None = None
        self.status = "running"
        self.last_sequence = max((a.last_sequence for a in self.previous), default=0)

    def seconds(self) -> float:
        """Seconds of this attempt so far."""
        return self.clock() - self.t0

    def cost(self) -> float:
        return round(self.seconds() / 3600 * self.hourly, 4)

    def total_seconds(self) -> float:
        return round(sum(a.seconds for a in self.previous) + self.seconds(), 1)

    def total_cost(self) -> float:
        return round(sum(a.cost_usd for a in self.previous) + self.cost(), 4)

    def current(self, status: str) -> Attempt:
        return Attempt(
            started_at=self.started_at,
            seconds=round(self.seconds(), 1),
            cost_usd=self.cost(),
            status=status,
            resumed_from_step=self.resumed_from_step,
            gpu=self.gpu,
            last_sequence=self.last_sequence,
        )

    def all(self) -> list[Attempt]:
        return [*self.previous, self.current(self.status)]

    def next_sequence(self) -> int:
        """Where this attempt's events continue the job's count (receivers drop non-increasing ones)."""
        return self.last_sequence + 1

    def record(self, status: str | None = None) -> None:
        """Rewrite this attempt's entry; best effort: a full volume must not fail the job."""
        self.status = status or self.status
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, [a.model_dump() for a in self.all()])

    # The reporter's channel interface: every event refreshes this attempt's entry.
    def send(self, event: Any, *, kind: str = "progress") -> None:
        self.last_sequence = max(self.last_sequence, int(event.get("sequence") or 0))
        self.record()

    def close(self, timeout_s: float = 0.0) -> bool:
        return True


def _read_attempts(path: Path) -> list[Attempt]:
    raw = read_json(path)
    out = []
    for item in raw if isinstance(raw, list) else []:
        with contextlib.suppress(ValueError):
            attempt = Attempt.model_validate(item)
            # An earlier attempt still marked running was killed before it could say how it ended.
            out.append(
                attempt.model_copy(update={"status": "interrupted"})
                if attempt.status == "running"
                else attempt
            )
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
