"""The worker's side of a multi-GPU job: launch the job's process group, pass /cancel to it, wait,
and tear it down with the job.

One group per job, started with torchrun's own launcher (agent.py) in a session of its own. The
worker holds the job folder's claim for the whole time; rank 0 writes the job's result and its
output (rundir.py), which is what the worker returns. When the group ends without one,
`GroupEnd` says how (which rank, which signal or error, at which stage and step) and the caller
writes and announces the failure like any other.

Out of memory on any rank: that rank leaves a note and exits, torchrun stops the others, and the
group is launched again from the last complete checkpoint with every micro-batch split in two and
gradient accumulation doubled (the one-process rule; the steps since that checkpoint are trained
again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lora_worker.runtime.device import Device
from lora_worker.runtime.files import read_json
from lora_worker.runtime.jobdir import JobPaths
from lora_worker.runtime.parallel.rundir import GroupDir, LaunchRequest, RankExit, RankFailure
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError, JobSpec
from lora_worker.runtime.training.checkpoints import kept_note
from lora_worker.runtime.training.oom import Recovery

log = logging.getLogger(__name__)

POLL_S = 0.5
# After /cancel: time for the group to finish its step, save a checkpoint and report (seconds);
# then it is stopped.
CANCEL_GRACE_S = 600.0
# After rank 0 wrote its output: time for the other ranks to exit before they are stopped (they
# normally left when training ended).
FOLLOWERS_GRACE_S = 60.0
# SIGTERM to the agent (which stops its ranks, SIGKILL after its own 30 s) and then SIGKILL.
STOP_GRACE_S = 45.0
# Beyond the job's max_duration_hours (which training itself respects), a group still running is stopped.
OVERRUN_S = 3600.0


@dataclass(frozen=True)
class GroupEnd:
    """How one job's group ended: rank 0's output, or why there is none."""

    output: dict | None
    message: str | None = None  # when there is no output: what happened, for the job's failure
    stage: str = "queued"  # rank 0's last stage
    cancelled: bool = False  # /cancel arrived and the group had to be stopped
    recoveries: tuple[Recovery, ...] = field(default=())


def group_size(spec: JobSpec, device: Device) -> int:
    """Processes that train the job, one per GPU: the job's choice, else every visible GPU (1 on the CPU)."""
    asked = spec.distributed.num_processes
    if asked is None:
        return max(1, device.count) if device.is_cuda else 1
    if device.is_cuda and asked > device.count:
        raise JobInputError(
            [
                f"distributed.num_processes: {asked} processes need {asked} GPUs; this worker has {device.count}"
            ]
        )
    return asked


def gpu_label(device: Device, processes: int) -> str:
    return f"{processes}x {device.name}" if processes > 1 else device.name


def events_sent(paths: JobPaths) -> int:
    """The highest event sequence any attempt of the job recorded (rank 0's attempt included)."""
    raw = read_json(paths.attempts)
    return (
        max((int(a.get("last_sequence") or 0) for a in raw if isinstance(a, dict)), default=0)
        if isinstance(raw, list)
        else 0
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The worker's settings as the environment variables they came from, for the ranks (which read
    them with Settings.from_env()): tests pass settings that are not in os.environ."""
    values: dict[str, Any] = {
        "VOLUME_DIR": settings.volume_dir,
        "WEBHOOK_SECRET": settings.webhook_secret,
        "HF_TOKEN": settings.hf_token,
        "HF_ENDPOINT": settings.hf_endpoint,
        "GPU_HOURLY_USD": settings.gpu_hourly_usd,
        "WANDB_API_KEY": settings.wandb_api_key,
        "PROGRESS_INTERVAL_S": settings.progress_interval_s,
        "REQUIRE_CUDA": "1" if settings.require_cuda else "",
        "KEEP_CHECKPOINTS": "1" if settings.keep_checkpoints else "",
        "JOB_LOCK_WAIT_S": settings.job_lock_wait_s,
        "JOB_LOCK_STALE_S": settings.job_lock_stale_s,
        "JUDGE_BASE_URL": settings.judge_base_url,
        "JUDGE_API_KEY": settings.judge_api_key,
        "JUDGE_MODEL": settings.judge_model,
    }
    return {k: "" if v is None else str(v) for k, v in values.items()}


def group_environment(
    settings: Settings, request: LaunchRequest, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    env = {**(os.environ if base is None else base), **settings_env(settings), **request.as_env()}
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks must not each take every core
    return env


def launch_group(
    request: LaunchRequest,
    paths: JobPaths,
    settings: Settings,
    *,
    cancel: threading.Event,
    max_seconds: float,
) -> GroupEnd:
    """Run the job on `request.processes` ranks to its end; relaunch after an out-of-memory error."""
    while True:
        request = replace(request, launched_at=time.time())
        gdir = GroupDir.create(paths.job_id)
        try:
            end = run_once(gdir, request, paths, settings, cancel=cancel, max_seconds=max_seconds)
            if end.output is None:  # the ranks' output is the first thing to read about a failure
                with contextlib.suppress(OSError):
                    shutil.copyfile(gdir.log, paths.root / "group.log")
        finally:
            shutil.rmtree(gdir.root, ignore_errors=True)
        if end.output is not None or not end.recoveries or cancel.is_set():
            return end
        log.warning(
            "job %s: %s; relaunching the group from its last checkpoint with micro-batches split in two",
            paths.job_id, end.message,
        )  # fmt: skip
        request = replace(request, recoveries=end.recoveries)


def run_once(
    gdir: GroupDir,
    request: LaunchRequest,
    paths: JobPaths,
    settings: Settings,
    *,
    cancel: threading.Event,
    max_seconds: float,
) -> GroupEnd:
    with open(gdir.log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lora_worker.runtime.parallel.agent", str(gdir.root)],
            env=group_environment(settings, request),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: signals to the worker's group do not reach it
        )
    try:
        cancelled = wait_for(proc, gdir, cancel, max_seconds)
    finally:
        if proc.poll() is None:  # the worker thread is leaving (an error, the process exiting)
            stop(proc)
    output = gdir.output()
    if output is not None:
        return GroupEnd(output)
    return describe_end(gdir, request.processes, paths, proc.returncode, cancelled)


def wait_for(proc: subprocess.Popen, gdir: GroupDir, cancel: threading.Event, max_seconds: float) -> bool:
    """Wait for the group to end; pass /cancel on and stop a group that does not end in time.
    Returns whether /cancel arrived."""
    started, cancelled_at, output_at = time.monotonic(), None, None
    while True:
        try:
            proc.wait(timeout=POLL_S)
            return cancelled_at is not None
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if cancel.is_set() and cancelled_at is None:
            cancelled_at = now
            gdir.cancel_flag.touch()
        if output_at is None and gdir.output_file.exists():
            output_at = now
        late = (
            (cancelled_at is not None and now - cancelled_at > CANCEL_GRACE_S)
            or (output_at is not None and now - output_at > FOLLOWERS_GRACE_S)
            or now - started > max_seconds + OVERRUN_S
        )
        if late:
            log.warning("job process group did not end in time; stopping it")
            stop(proc)
            return cancelled_at is not None


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the agent (it stops its ranks), then SIGKILL its whole session."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def describe_end(
    gdir: GroupDir, processes: int, paths: JobPaths, returncode: int | None, cancelled: bool
) -> GroupEnd:
    """Why the group ended without rank 0's output: a rank's note, the rank that failed first, where."""
    notes = gdir.exits(processes)
    progress = gdir.last_progress()
    stage = str(progress.get("stage") or "queued")
    where = stage + (
        f" (step {progress['step']} of {progress['total_steps']})" if progress.get("total_steps") else ""
    )
    oom = next((n for n in notes if n.kind == "out_of_memory"), None)
    if oom is not None:
        return GroupEnd(
            None, f"{_rank_story(oom, processes)} during {where}", stage, cancelled, oom.recoveries
        )
    if cancelled:
        what = f"cancelled during {where}; the process group was stopped"
    else:
        what = f"{_first_failure(notes, gdir.failures(), returncode, processes)} during {where}"
    return GroupEnd(None, what + kept_note(paths.checkpoints), stage, cancelled)


def _rank_story(note: RankExit, processes: int) -> str:
    return f"rank {note.rank} of {processes} failed: {note.message}"


def _first_failure(
    notes: list[RankExit], failures: list[RankFailure] | None, returncode: int | None, processes: int
) -> str:
    if failures:
        first = failures[0]
        note = next((n for n in notes if n.rank == first.rank), None)
        if note is not None:
            return _rank_story(note, processes)
        return f"rank {first.rank} of {processes} {first.describe()}"
    if notes:
        return _rank_story(notes[0], processes)
    return f"the job's process group ended without a result (launcher exit code {returncode})"
