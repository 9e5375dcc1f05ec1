"""How the worker and one launch of a job's process group talk: the request in the environment, and a
private folder on the worker's local disk (not the job folder: a delivery refused by rank 0 touches
nothing of the job), removed when the group has ended.

    $LORA_WORKER_GROUP_REQUEST  what every rank runs: the job input (presigned URLs included, so it
                     is never written to a file), the RunPod job, earlier out-of-memory splits
    cancel           present once /cancel arrived; rank 0 polls it
    progress.json    rank 0's last stage and step (for a group that dies without a result)
    output.json      rank 0's output: the job ended as a job (completed, failed or cancelled)
    exit-rank<r>.json  how rank r ended when it ended on an error (out of memory, an exception)
    group-exit.json  the launcher's view: which rank failed first, with which exit code or signal
    group.log        every rank's stdout and stderr (copied into the job folder when the group
                     ended without a result)

The ranks read the worker's settings from their environment too.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_worker.runtime.files import atomic_write_json, read_json
from lora_worker.runtime.training.oom import Recovery

REQUEST_ENV = "LORA_WORKER_GROUP_REQUEST"


@dataclass(frozen=True)
class LaunchRequest:
    """What every rank of one launch runs."""

    job_input: Any
    runpod_job: dict | None
    default_job_id: str | None
    processes: int
    recoveries: tuple[Recovery, ...] = ()  # out-of-memory splits of earlier launches
    launched_at: float = 0.0  # unix time the worker launched the group: its GPUs are held from then

    def as_json(self) -> dict:
        return {**asdict(self), "recoveries": [asdict(r) for r in self.recoveries]}

    def as_env(self) -> dict[str, str]:
        return {REQUEST_ENV: json.dumps(self.as_json())}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LaunchRequest:
        return cls.from_json(json.loads((os.environ if env is None else env)[REQUEST_ENV]))

    @classmethod
    def from_json(cls, raw: dict) -> LaunchRequest:
        return cls(
            job_input=raw["job_input"],
            runpod_job=raw.get("runpod_job"),
            default_job_id=raw.get("default_job_id"),
            processes=int(raw["processes"]),
            recoveries=tuple(Recovery(**r) for r in raw.get("recoveries") or ()),
            launched_at=float(raw.get("launched_at") or 0.0),
        )


@dataclass(frozen=True)
class RankExit:
    """How a rank ended when it did not end normally."""

    rank: int
    kind: str  # "out_of_memory" (the group relaunches with smaller micro-batches) or "error"
    message: str
    recoveries: tuple[Recovery, ...] = field(default=())

    @classmethod
    def from_json(cls, raw: dict) -> RankExit:
        return cls(
            rank=int(raw["rank"]),
            kind=str(raw["kind"]),
            message=str(raw["message"]),
            recoveries=tuple(Recovery(**r) for r in raw.get("recoveries") or ()),
        )


@dataclass(frozen=True)
class RankFailure:
    """A rank the launcher saw fail: its exit code, or the signal that killed it."""

    rank: int
    exitcode: int

    @property
    def signal_name(self) -> str | None:
        if self.exitcode >= 0:
            return None
        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    def describe(self) -> str:
        sig = self.signal_name
        return f"was killed by {sig}" if sig else f"exited with code {self.exitcode}"


@dataclass(frozen=True)
class GroupDir:
    root: Path

    @classmethod
    def create(cls, job_id: str) -> GroupDir:
        return cls(Path(tempfile.mkdtemp(prefix=f"lora-worker-group-{job_id}-")))

    @property
    def cancel_flag(self) -> Path:
        return self.root / "cancel"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def output_file(self) -> Path:
        return self.root / "output.json"

    @property
    def group_exit(self) -> Path:
        return self.root / "group-exit.json"

    @property
    def log(self) -> Path:
        return self.root / "group.log"

    def exit_note(self, rank: int) -> Path:
        return self.root / f"exit-rank{rank}.json"

    def output(self) -> dict | None:
        out = read_json(self.output_file)
        return out if isinstance(out, dict) else None

    def write_exit(self, note: RankExit) -> None:
        atomic_write_json(
            self.exit_note(note.rank), {**asdict(note), "recoveries": [asdict(r) for r in note.recoveries]}
        )

    def exits(self, processes: int) -> list[RankExit]:
        notes = (read_json(self.exit_note(r)) for r in range(processes))
        return [RankExit.from_json(n) for n in notes if isinstance(n, dict)]

    def failures(self) -> list[RankFailure] | None:
        """The ranks the launcher saw fail, the first one first; None when it recorded nothing."""
        raw = read_json(self.group_exit)
        if not isinstance(raw, dict):
            return None
        return [RankFailure(int(f["rank"]), int(f["exitcode"])) for f in raw.get("failures", [])]

    def last_progress(self) -> dict:
        raw = read_json(self.progress)
        return raw if isinstance(raw, dict) else {}


class ProgressFile:
    """An event channel for rank 0: keeps its last stage and step in progress.json, so a group that dies
    without a result can say where it was."""

    def __init__(self, group_dir: GroupDir):
        self.path = group_dir.progress

    def send(self, event: Any, *, kind: str = "progress") -> None:
        try:
            atomic_write_json(
                self.path,
                {
                    "stage": event.get("stage"),
                    "step": event.get("step"),
                    "total_steps": event.get("total_steps"),
                },
            )
        except OSError:  # a full volume costs this note, never the job
            pass

    def close(self, timeout_s: float = 0.0) -> bool:
        return True
