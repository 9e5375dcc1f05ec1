"""Checkpoints on the volume: marked complete with their files' checksums, verified before resume.

The Trainer writes `checkpoint-<step>/` in place; `CheckpointCallback.on_save` runs only after
every file is written, and only then writes the completion marker: a JSON list of each file's
size and SHA-256. A worker killed mid-write leaves a folder without a marker (ignored by resume,
removed by `clean_incomplete`); a file damaged after the marker was written (a truncated upload, a
bad block) fails verification, and `find_resumable` moves that checkpoint aside, keeps it, says
so, and falls back to the previous complete one.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from transformers import TrainerCallback

from lora_worker.runtime.files import (
    DiskSpaceError,
    atomic_write_json,
    read_json,
    require_free_space,
    sha256_file,
    tree_bytes,
)

log = logging.getLogger(__name__)

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"
_NAME = re.compile(r"checkpoint-(\d+)")
_ASIDE = re.compile(r"checkpoint-\d+\.corrupt-.+")
SAVE_MARGIN = 1.2  # a checkpoint save needs its estimated size x this free (files grow with the step)


def step_of(path: Path | str) -> int | None:
    """The step number of a `checkpoint-<step>` folder; None for any other name."""
    m = _NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(folder: Path) -> list[Path]:
    """Every `checkpoint-<step>` folder (complete or not), by step, oldest first."""
    if not Path(folder).is_dir():
        return []
    found = [(step_of(p), p) for p in Path(folder).iterdir() if p.is_dir() and step_of(p) is not None]
    return [p for _, p in sorted(found)]


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE_MARKER).is_file()


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints whose write finished (marker present), oldest first; not verified."""
    return [p for p in checkpoint_dirs(folder) if is_complete(p)]


def kept_note(folder: Path, none: str = "; no checkpoint was kept") -> str:
    """What a job that ended early tells its user about resuming: the newest complete checkpoint
    in `folder`, or `none` when there is none."""
    kept = complete_checkpoints(folder)
    if not kept:
        return none
    return f"; checkpoint at step {step_of(kept[-1])} kept, resubmit the same job_id to resume"


def write_marker(ckpt: Path, *, step: int) -> None:
    """Record every file of a finished checkpoint (size and SHA-256), atomically, as its marker."""
    files = {
        str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(".")
    }
    atomic_write_json(ckpt / COMPLETE_MARKER, {"step": step, "time": time.time(), "files": files})


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file the marker lists is present with its size and SHA-256; else what is wrong.

    A marker from a worker that did not record checksums (a JSON object without "files") has
    nothing to verify against and passes; `find_resumable` says so.
    """
    marker = read_json(ckpt / COMPLETE_MARKER)
    if not isinstance(marker, dict):
        return f"{ckpt.name}: its completion marker is unreadable"
    if "files" not in marker:
        return None
    if not isinstance(marker["files"], dict) or not marker["files"]:
        return f"{ckpt.name}: its completion marker lists no files"
    for name, want in marker["files"].items():
        path = ckpt / name
        if not path.is_file():
            return f"{ckpt.name}: {name} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{ckpt.name}: {name} has {size} bytes, {want.get('size')} were written"
        if sha256_file(path) != want.get("sha256"):
            return f"{ckpt.name}: {name} does not match its SHA-256"
    return None


@dataclass(frozen=True)
class ResumePoint:
    """Where training resumes: a verified checkpoint, or none (train from the start), and why."""

    checkpoint: Path | None
    reason: str  # which checkpoint was used, or why none could be
    warnings: tuple[str, ...] = ()  # corrupt checkpoints moved aside (kept, named here)

    @property
    def step(self) -> int | None:
        return step_of(self.checkpoint) if self.checkpoint else None


def find_resumable(folder: Path, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> ResumePoint:
    """The newest complete checkpoint that verifies, falling back to older ones.

    A checkpoint that fails verification is renamed `checkpoint-<step>.corrupt-<UTC time>` (kept
    for inspection, never trained from again) and named in the warnings. Nothing is deleted;
    folders without a marker are ignored here (see `clean_incomplete`).
    """
    folder = Path(folder)
    warnings: list[str] = []
    for ckpt in reversed(complete_checkpoints(folder)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            checked = (
                "verified"
                if "files" in (read_json(ckpt / COMPLETE_MARKER) or {})
                else "unverified (no checksums)"
            )
            fallback = " (a newer one was corrupt)" if warnings else ""
            return ResumePoint(ckpt, f"resuming from {ckpt.name}, {checked}{fallback}", tuple(warnings))
        aside = ckpt.with_name(f"{ckpt.name}.corrupt-{clock().strftime('%Y%m%dT%H%M%SZ')}")
        ckpt.rename(aside)
        warnings.append(f"checkpoint moved aside as {aside.name}, not resumed from: {problem}")
        log.warning("%s", warnings[-1])
    reason = (
        "no usable checkpoint (every complete one was corrupt): training starts from step 0"
        if warnings
        else f"no complete checkpoint in {folder}: training starts from step 0"
    )
    return ResumePoint(None, reason, tuple(warnings))


def clean_incomplete(folder: Path) -> list[str]:
    """Remove checkpoint folders a killed worker left half-written (no marker); returns their names."""
    removed = []
    for p in checkpoint_dirs(folder):
        if not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def prune_checkpoints(folder: Path, *, keep: int = 0) -> int:
    """After a job completes: remove all but the newest `keep` complete checkpoints, every incomplete
    one and every corrupt one kept aside; returns the bytes freed.

    The adapter, report, result and archive live outside `folder` and are not touched.
    """
    folder = Path(folder)
    complete = complete_checkpoints(folder)
    doomed = [p for p in checkpoint_dirs(folder) if not is_complete(p)]
    doomed += complete[: max(0, len(complete) - keep)]
    if folder.is_dir():
        doomed += [p for p in folder.iterdir() if p.is_dir() and _ASIDE.fullmatch(p.name)]
    freed = 0
    for p in doomed:
        size = tree_bytes(p)
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            freed += size
    return freed


def estimate_checkpoint_bytes(folder: Path, model=None, optimizer=None) -> int:
    """Bytes the next checkpoint will take: the last complete one's size, else the trainable
    weights plus the optimizer's state as they are in memory (a checkpoint stores both)."""
    done = complete_checkpoints(folder)
    if done:
        return tree_bytes(done[-1])
    total = 0
    if model is not None:
        total += sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values():
            if hasattr(v, "element_size"):
                total += v.numel() * v.element_size()
    return total


class CheckpointCallback(TrainerCallback):
    """Save every N steps (the Trainer's save_steps) and also every `minutes`; check free space
    first; mark complete with checksums; keep the newest `keep` complete checkpoints.

    Runs after the callbacks that ask for a save (so it sees every request): when the checkpoint
    would not fit on the volume, training stops cleanly with the numbers in GB (`reason`) instead
    of failing half-way through the write.

    In a process group (`ranks`, an object with `barrier()`) every rank writes its part of the
    checkpoint (rank 0 the weights and optimizer, each rank its RNG state); the marker is written
    once, by rank 0, after every rank has finished.
    """

    def __init__(self, folder: Path, *, minutes: float, keep: int = 2, ranks=None):
        self.folder, self.seconds, self.keep = Path(folder), minutes * 60.0, max(1, keep)
        self.ranks = ranks
        self.reason: str | None = None
        self._last = time.monotonic()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # a callback that stops training has decided whether this step is saved
        if not control.should_training_stop and time.monotonic() - self._last >= self.seconds:
            control.should_save = True
        if control.should_save:
            self.check_space(state, control, model, optimizer)

    def on_log(self, args, state, control, model=None, optimizer=None, **kwargs):
        if control.should_save:  # a callback may have asked for a save while logging
            self.check_space(state, control, model, optimizer)

    def check_space(self, state, control, model, optimizer) -> None:
        need = estimate_checkpoint_bytes(self.folder, model, optimizer)
        try:
            require_free_space(
                self.folder, int(need * SAVE_MARGIN), f"the checkpoint at step {state.global_step}"
            )
        except DiskSpaceError as err:
            self.reason = str(err)
            control.should_save = False
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.ranks is not None:
            self.ranks.barrier()
        ckpt = self.folder / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            write_marker(ckpt, step=state.global_step)
            for old in complete_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._last = time.monotonic()
