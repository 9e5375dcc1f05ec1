"""The job folder: one writer per job id, resubmissions that reuse or refuse, attempts that add up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lora_worker.runtime.jobdir import (
    AttemptLog,
    JobPaths,
    JobRefused,
    check_resubmission,
    claim,
    stored_result,
)

FP = {"dataset_sha256": "abc", "hyperparameters": {"learning_rate": 0.0002, "num_epochs": 2}}


def _holder(job_root) -> subprocess.Popen:
    """A second real process that claims the job and holds it until killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from lora_worker.runtime.jobdir import JobPaths, claim
        with claim(JobPaths(Path({str(job_root)!r}), "j1"), wait_s=5, stale_s=60):
            print("held", flush=True)
            sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_name(tmp_path):
    paths = JobPaths(tmp_path / "j1", "j1")
    holder = _holder(paths.root)
    try:
        with pytest.raises(JobRefused) as err:
            with claim(paths, wait_s=0.5, stale_s=60):
                pass
        assert f"pid {holder.pid}" in str(err.value)
        assert "already running" in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    paths = JobPaths(tmp_path / "j1", "j1")
    holder = _holder(paths.root)
    os.kill(holder.pid, signal.SIGKILL)  # the worker dies without releasing its lock
    holder.wait()
    with claim(paths, wait_s=5, stale_s=60) as lock:
        assert lock.is_held()


def _completed(paths: JobPaths) -> bytes:
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.fingerprint.write_text(json.dumps(FP))
    paths.result.write_text(json.dumps({"job_id": "j1", "status": "completed", "metrics": {"steps": 4}}))
    return paths.result.read_bytes()


def test_a_completed_job_returns_its_stored_result_for_the_same_input(tmp_path):
    paths = JobPaths(tmp_path / "j1", "j1")
    _completed(paths)
    stored = check_resubmission(paths, FP, has_checkpoint=False)
    assert stored == {"job_id": "j1", "status": "completed", "metrics": {"steps": 4}}


def test_a_refused_resubmission_leaves_the_completed_result_untouched(tmp_path):
    paths = JobPaths(tmp_path / "j1", "j1")
    before = _completed(paths)
    changed = {**FP, "hyperparameters": {"learning_rate": 0.001, "num_epochs": 2}}
    with pytest.raises(JobRefused) as err:
        check_resubmission(paths, changed, has_checkpoint=True)
    assert "already completed" in str(err.value) and "hyperparameters.learning_rate" in str(err.value)
    assert "resume" not in str(err.value)  # nothing to resume in a finished job
    assert paths.result.read_bytes() == before
    # the next valid resubmission still gets the stored result instead of training again
    assert check_resubmission(paths, FP, has_checkpoint=True)["status"] == "completed"


def test_checkpoints_of_another_job_are_not_resumed(tmp_path):
    paths = JobPaths(tmp_path / "j1", "j1")
    paths.root.mkdir(parents=True)
    paths.fingerprint.write_text(json.dumps(FP))
    with pytest.raises(JobRefused, match="resubmit with the original input"):
        check_resubmission(paths, {**FP, "dataset_sha256": "other"}, has_checkpoint=True)
    # without checkpoints nothing is lost: the new input replaces the old fingerprint
    assert check_resubmission(paths, {**FP, "dataset_sha256": "other"}, has_checkpoint=False) is None
    assert json.loads(paths.fingerprint.read_text())["dataset_sha256"] == "other"


def test_a_failed_or_dry_run_result_is_not_a_stored_result(tmp_path):
    paths = JobPaths(tmp_path / "j1", "j1")
    paths.root.mkdir(parents=True)
    paths.result.write_text(json.dumps({"status": "failed"}))
    assert stored_result(paths) is None
    paths.result.write_text(json.dumps({"status": "completed", "dry_run": True}))
    assert stored_result(paths) is None


def test_attempts_add_up_across_deliveries(tmp_path):
    paths = JobPaths(tmp_path / "j1", "j1")
    paths.root.mkdir(parents=True)
    now = [100.0]
    first = AttemptLog(paths, hourly_usd=3.6, gpu="H100", clock=lambda: now[0])
    now[0] += 65.5
    # an event refreshes the attempt's entry; then the worker dies
    first.send({"status": "training", "sequence": 7})
    second = AttemptLog(paths, hourly_usd=3.6, gpu="H100", clock=lambda: now[0])
    now[0] += 69.9
    assert second.total_seconds() == pytest.approx(135.4)
    assert second.total_cost() == pytest.approx(135.4 / 3600 * 3.6, abs=1e-4)
    second.record("completed")
    stored = json.loads(paths.attempts.read_text())
    assert [a["status"] for a in stored] == ["interrupted", "completed"]
    assert [a["seconds"] for a in stored] == [65.5, 69.9]
    assert second.next_sequence() == 8  # the resumed job's events continue the count
