"""prune: reports what jobs hold, frees checkpoints of finished jobs and corrupt copies, never a running job."""

from __future__ import annotations

import json
import os
import time

from lora_worker.runtime.jobdir import LOCK_NAME
from lora_worker.runtime.volume_lock import VolumeLock
from lora_worker.tools import prune


def make_job(volume, job_id, status, *, checkpoints=("checkpoint-2", "checkpoint-4"), age_days=0.0):
    root = volume / "jobs" / job_id
    for name in checkpoints:
        (root / "checkpoints" / name).mkdir(parents=True)
        (root / "checkpoints" / name / "optimizer.pt").write_bytes(b"o" * 10_000)
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"a" * 5_000)
    if status:
        (root / "result.json").write_text(json.dumps({"status": status}))
    old = time.time() - age_days * 86400
    for p in root.rglob("*"):
        os.utime(p, (old, old))
    return root


def test_prune_reports_then_frees_only_what_is_safe(tmp_path, capsys):
    done = make_job(tmp_path, "done", "completed", checkpoints=("checkpoint-2", "checkpoint-4.corrupt-x"))
    old_failed = make_job(tmp_path, "old-failed", "failed", age_days=30)
    new_failed = make_job(tmp_path, "new-failed", "cancelled", age_days=1)
    running = make_job(tmp_path, "running", None)
    bad_copy = tmp_path / "models" / "org--m" / "prequantized" / "main--q1.corrupt-2026"
    bad_copy.mkdir(parents=True)
    (bad_copy / "model.safetensors").write_bytes(b"m" * 7_000)

    with VolumeLock(running / LOCK_NAME, purpose="job running"):
        assert prune.main(["--volume-dir", str(tmp_path), "--older-than-days", "7"]) == 0
        report = capsys.readouterr().out
        assert "running" in report and "completed" in report
        assert (done / "checkpoints" / "checkpoint-2").exists()  # report only: nothing removed
        assert prune.main(["--volume-dir", str(tmp_path), "--older-than-days", "7", "--apply"]) == 0
        assert "freed" in capsys.readouterr().out

    assert list((done / "checkpoints").iterdir()) == []  # checkpoints of a completed job go, corrupt ones too
    assert (done / "adapter" / "adapter_model.safetensors").exists()  # the adapter stays
    assert list((old_failed / "checkpoints").iterdir()) == []  # old enough, and asked for
    assert len(list((new_failed / "checkpoints").iterdir())) == 2  # recent: may still be resumed
    assert len(list((running / "checkpoints").iterdir())) == 2  # locked: never touched
    assert not bad_copy.exists()
