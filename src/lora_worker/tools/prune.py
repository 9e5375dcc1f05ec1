"""`python -m lora_worker prune`: what old jobs hold on the volume, and freeing it.

By default it only reports. `--apply` frees, for each job it can lock (a running job holds its
lock and is never touched):

- the optimizer checkpoints of completed jobs (the adapter, report, result and archive stay);
- checkpoints and NF4 copies set aside as corrupt;
- with `--older-than-days N`, the checkpoints of failed and cancelled jobs last written more than
  N days ago (they could still be resumed, so only on request);
- with `--merged`, the bf16 merged models of completed jobs (about 141 GB each for 70B).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_worker.runtime.files import GB, read_json, tree_bytes
from lora_worker.runtime.jobdir import LOCK_NAME, JobPaths
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.volume_lock import LockTimeoutError, VolumeLock

DAY_S = 86400.0


@dataclass
class JobUsage:
    job_id: str
    status: str  # completed, failed, cancelled, unfinished (no result yet), running (locked)
    bytes_by_part: dict[str, int]
    age_days: float
    freeable: list[Path] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_part.values())


def job_status(paths: JobPaths) -> str:
    result = read_json(paths.result)
    return str(result.get("status")) if isinstance(result, dict) and result.get("status") else "unfinished"


def freeable(
    paths: JobPaths, status: str, *, older_than_days: float | None, merged: bool, age_days: float
) -> list[Path]:
    """What `--apply` would remove from one job's folder."""
    out = sorted(paths.checkpoints.glob("checkpoint-*.corrupt-*"))
    if status == "completed":
        out += [p for p in sorted(paths.checkpoints.glob("checkpoint-*")) if p not in out]
        if merged and (paths.root / "merged").exists():
            out.append(paths.root / "merged")
    elif (
        status in ("failed", "cancelled", "unfinished")
        and older_than_days is not None
        and age_days > older_than_days
    ):
        out += [p for p in sorted(paths.checkpoints.glob("checkpoint-*")) if p not in out]
    return out


def scan(
    volume: Path, *, older_than_days: float | None = None, merged: bool = False, now: float | None = None
) -> list[JobUsage]:
    now = time.time() if now is None else now
    usages = []
    for root in sorted((volume / "jobs").glob("*")):
        if not root.is_dir():
            continue
        paths = JobPaths(root, root.name)
        lock = VolumeLock(root / LOCK_NAME)
        status = "running" if lock.owner() is not None else job_status(paths)
        age = (
            now
            - max((p.stat().st_mtime for p in root.rglob("*") if p.is_file()), default=root.stat().st_mtime)
        ) / DAY_S
        parts = {
            "checkpoints": tree_bytes(paths.checkpoints),
            "adapter": tree_bytes(paths.adapter),
            "archive": tree_bytes(paths.archive),
            "report": tree_bytes(paths.report),
            "dataset": tree_bytes(paths.dataset),
            "merged": tree_bytes(root / "merged"),
        }
        usage = JobUsage(root.name, status, parts, round(age, 1))
        if status != "running":
            usage.freeable = freeable(
                paths, status, older_than_days=older_than_days, merged=merged, age_days=age
            )
        usages.append(usage)
    return usages


def corrupt_model_copies(volume: Path) -> list[Path]:
    return sorted((volume / "models").glob("*/prequantized/*.corrupt-*"))


def apply(volume: Path, usages: list[JobUsage]) -> int:
    """Remove what each usage lists, under that job's lock; a job locked meanwhile is skipped."""
    freed = 0
    for usage in usages:
        if not usage.freeable:
            continue
        lock = VolumeLock(volume / "jobs" / usage.job_id / LOCK_NAME, purpose=f"prune {usage.job_id}")
        try:
            lock.acquire(timeout_s=0)
        except LockTimeoutError:
            usage.status = "running"
            continue
        try:
            for path in usage.freeable:
                freed += tree_bytes(path)
                shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.release()
    for path in corrupt_model_copies(volume):
        freed += tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
    return freed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker prune",
        description="Report what jobs hold on the volume; with --apply, free optimizer checkpoints of completed jobs "
        "and anything set aside as corrupt (never a running job).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--volume-dir", type=Path, default=None, help="default: VOLUME_DIR, /runpod-volume or ./.volume"
    )
    p.add_argument(
        "--apply", action="store_true", help="remove what is listed as freeable (default: report only)"
    )
    p.add_argument(
        "--older-than-days",
        type=float,
        default=None,
        help="also free the checkpoints of failed, cancelled and unfinished jobs untouched for this many days",
    )
    p.add_argument("--merged", action="store_true", help="also free merged bf16 models of completed jobs")
    a = p.parse_args(argv)
    volume = a.volume_dir or Settings.from_env().volume_dir
    usages = scan(volume, older_than_days=a.older_than_days, merged=a.merged)
    corrupt = corrupt_model_copies(volume)
    for u in usages:
        free = sum(tree_bytes(f) for f in u.freeable)
        print(
            f"{u.job_id:<40} {u.status:<11} {u.total / GB:8.2f} GB  {u.age_days:6.1f} d  freeable {free / GB:8.2f} GB"
        )
    reclaim = sum(tree_bytes(f) for u in usages for f in u.freeable) + sum(tree_bytes(c) for c in corrupt)
    print(f"{len(usages)} job(s); {len(corrupt)} corrupt NF4 copy(ies); freeable {reclaim / GB:.2f} GB")
    if not a.apply:
        print("report only: add --apply to free it", file=sys.stderr)
        return 0
    freed = apply(volume, usages)
    print(f"freed {freed / GB:.2f} GB")
    return 0
