"""The `list` task: trained adapters on the volume from their stored results, newest first, without
touching any job folder."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from lora_worker.runtime import handler as worker
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.tasks.listing import list_adapters, run_list

LINEAGE = {
    "job_id": "new",
    "dataset": {
        "file_name": "export-v5.json",
        "source": "https://storage.example.com/export-v5.json",
        "name": "brightrun",
        "version": "5.0.0",
        "format": "brightrun-lora-v4",
        "sha256": "e" * 64,
        "size_bytes": 10,
        "conversations": 240,
        "pairs": 1500,
        "train_conversations": 216,
        "eval_conversations": 24,
        "trainable_tokens": 9,
    },  # fmt: skip
    "base_model": {"model_id": "meta-llama/Meta-Llama-3-70B-Instruct", "revision": "a" * 40, "source": "hub"},
    "settings": {},
    "previous_adapter": {"job_id": "old", "path": "/v/jobs/old/adapter"},
}


def write_job(volume: Path, job_id: str, result: dict | str | None, *, adapter: dict | None = None) -> Path:
    job = volume / "jobs" / job_id
    job.mkdir(parents=True)
    if result is not None:
        (job / "result.json").write_text(result if isinstance(result, str) else json.dumps(result))
    if adapter is not None:
        (job / "adapter").mkdir()
        (job / "adapter" / "adapter_config.json").write_text(json.dumps(adapter))
        (job / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    return job


def completed(job_id: str, started: str, **extra) -> dict:
    return {
        "job_id": job_id,
        "status": "completed",
        "stage": "completed",
        "verdict": "improved",
        "outcome": {"verdict": "improved", "reason": "held-out loss 2.0 -> 1.8", "threshold": 0.005},
        "metrics": {
            "eval_loss_before": 2.0,
            "eval_loss_after": 1.8,
            "steps": 40,
            "peak_gpu_memory_gib": 70.0,
        },
        "dataset": {"name": "brightrun", "version": "4.0.0", "conversations": 24, "pairs": 156},
        "attempts": [{"started_at": started, "seconds": 1.0, "cost_usd": 0.0, "status": "completed"}],
        **extra,
    }


def snapshot(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_only_trained_adapters_are_listed_newest_first_with_lineage_and_nothing_is_touched(tmp_path):
    adapter_cfg = {"peft_type": "LORA", "r": 16, "base_model_name_or_path": "meta-llama/Meta-Llama-3-70B-Instruct",
                   "revision": "b" * 40}  # fmt: skip
    new = write_job(tmp_path, "new", completed("new", "2026-11-02T10:00:00+00:00", lineage=LINEAGE, adapter={
        "path": str(tmp_path / "jobs" / "new" / "adapter"), "archive": "/v/new.tar.gz", "sha256": "d" * 64,
        "size_bytes": 400_000_000}), adapter=adapter_cfg)  # fmt: skip
    old = write_job(tmp_path, "old", completed("old", "2026-08-01T10:00:00+00:00"), adapter=adapter_cfg)
    write_job(tmp_path, "gone", completed("gone", "2026-01-01T10:00:00+00:00"))  # adapter folder deleted
    write_job(tmp_path, "dry", {**completed("dry", "2026-11-03T00:00:00+00:00"), "dry_run": True})
    write_job(tmp_path, "failed", {"job_id": "failed", "status": "failed", "stage": "training", "error": "x"})
    write_job(tmp_path, "chat", {**completed("chat", "2026-11-04T00:00:00+00:00"), "task": "generate"})
    running = write_job(tmp_path, "running", None)
    (running / ".job.lock").write_text("held")
    write_job(tmp_path, "broken", '{"status": "compl')
    before = snapshot(tmp_path)

    adapters, skipped = list_adapters(tmp_path)

    assert [a.job_id for a in adapters] == ["new", "old", "gone"]
    assert skipped == ["broken: result.json is not readable JSON"]
    first = adapters[0]
    assert first.base_model == "meta-llama/Meta-Llama-3-70B-Instruct" and first.base_revision == "a" * 40
    assert first.dataset.sha256 == "e" * 64 and first.dataset.version == "5.0.0"
    assert first.dataset.file_name == "export-v5.json" and first.dataset.conversations == 240
    assert first.previous_adapter == "old" and first.lineage == LINEAGE
    assert first.metrics == {"eval_loss_before": 2.0, "eval_loss_after": 1.8, "steps": 40}
    assert first.verdict == "improved" and first.headline == "held-out loss 2.0 -> 1.8"
    assert first.archive_sha256 == "d" * 64 and first.size_bytes == 400_000_000 and first.lora_r == 16
    assert first.adapter_present and first.trained_at == "2026-11-02T10:00:00+00:00"
    # without lineage, the adapter's own config and the dataset summary fill in
    second = adapters[1]
    assert second.base_model == "meta-llama/Meta-Llama-3-70B-Instruct" and second.base_revision == "b" * 40
    assert second.dataset.name == "brightrun" and second.dataset.sha256 is None
    assert second.adapter_path == str(old / "adapter")
    assert not adapters[2].adapter_present
    assert snapshot(tmp_path) == before  # read only: nothing written, moved or locked
    assert [a.job_id for a in list_adapters(tmp_path, limit=1)[0]] == ["new"]
    assert new.exists()


def test_list_through_the_handler_and_its_input_rules(monkeypatch, tmp_path):
    monkeypatch.setattr(worker, "_settings", Settings.from_env({"VOLUME_DIR": str(tmp_path)}))
    out = asyncio.run(worker.handler({"id": "rp-1", "input": {"task": "list"}}))
    assert out == {
        "job_id": "rp-1", "task": "list", "status": "completed", "stage": "completed", "error_message": None,
        "adapters": [], "count": 0, "skipped": [],
    }  # fmt: skip
    bad = run_list(
        {"task": "list", "limit": 0, "hf_token": "x"}, settings=Settings.from_env({"VOLUME_DIR": "/x"})
    )
    assert bad["status"] == "failed" and "limit: Input should be greater than or equal to 1" in bad["error"]
    assert "hf_token: secrets are not accepted" in bad["error"]
