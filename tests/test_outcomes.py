"""The failure path cannot fail: a full volume costs result.json, never the result or the final event."""

from __future__ import annotations

import json

import pytest
from conftest import Recorder, tmpfs

from lora_worker.runtime.contracts import JobResult
from lora_worker.runtime.events.progress import CostMeter, Reporter
from lora_worker.runtime.jobdir import AttemptLog, JobPaths
from lora_worker.runtime.outcomes import finish


@pytest.fixture
def full_volume(tmp_path):
    """A real 64 KiB filesystem, filled to the last byte."""
    with tmpfs(tmp_path / "full", "64k") as mnt:
        (mnt / "jobs" / "j1").mkdir(parents=True)
        try:
            with open(mnt / "filler", "wb") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
        except OSError:
            pass  # ENOSPC: the volume is full
        yield mnt


def test_finish_on_a_full_volume_still_returns_the_result_and_sends_the_final_event(full_volume):
    paths = JobPaths(full_volume / "jobs" / "j1", "j1")
    seen = Recorder()
    reporter = Reporter("j1", meter=CostMeter(0.0), channels=[seen])
    attempt = AttemptLog(paths, hourly_usd=0.0, gpu="cpu")
    failed = JobResult(
        job_id="j1", status="failed", stage="training", error="disk full", error_message="disk full"
    )
    output = finish(failed, paths, reporter, attempt, drain_s=1.0)
    assert output["status"] == "failed" and output["error"] == "disk full"
    assert any("result.json could not be written" in w for w in output["warnings"])
    assert seen.events[-1]["stage"] == "failed" and seen.events[-1]["error_message"] == "disk full"
    assert not paths.result.exists()
    assert [p.name for p in paths.root.iterdir()] == []  # no temporary file left behind
    json.dumps(output, allow_nan=False)
