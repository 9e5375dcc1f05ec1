"""The files through which the worker and one launch of a job's process group talk: `jobs/<job_id>/group/`.

    launch.json      what every rank runs (the job input, the RunPod job, earlier out-of-memory splits)
    cancel           present once /cancel arrived; rank 0 polls it
    progress.json    rank 0's last stage and step (for a group that dies without a result)
    output.json      rank 0's output: the job ended as a job (completed, failed or cancelled)
    exit-rank<r>.json  how rank r ended when it ended on an error (out of memory, an exception)
    group-exit.json  the launcher's view: which rank failed first, with which exit code or signal
    group.log        every rank's stdout and stderr

No secret is written here: the ranks read the worker's settings from their environment.
"""

from __future__ import annotations

import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_worker.runtime.files import atomic_write_json, read_json
from lora_worker.runtime.training.oom import Recovery


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

    @property
    def launch(self) -> Path:
        return self.root / "launch.json"

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

    def fresh(self, request: LaunchRequest) -> None:
        """Empty the folder (an earlier launch's files) and write this launch's request."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        atomic_write_json(self.launch, request.as_json())

    def request(self) -> LaunchRequest:
        return LaunchRequest.from_json(read_json(self.launch))

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
