"""The `list` task: the trained adapters on the volume, from their stored results (the dashboard's
model list).

Only reads: `<volume>/jobs/*/result.json` (written atomically, so never half-read) and each
adapter's adapter_config.json. A running job has no completed result yet and is not listed; nothing
in any job folder is written, locked or moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_worker.runtime.files import read_json
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError
from lora_worker.runtime.tasks.results import AdapterEntry, DatasetRef, ListResult
from lora_worker.runtime.tasks.spec import parse_list_input

KEY_METRICS = (
    "train_loss",
    "eval_loss_before",
    "eval_loss_after",
    "perplexity_before",
    "perplexity_after",
    "steps",
    "epochs",
    "tokens_trained",
)


def is_trained_adapter(result: dict[str, Any]) -> bool:
    """A completed training job that trained (not a dry run, not a generate or list request)."""
    return (
        result.get("status") == "completed"
        and not result.get("dry_run")
        and result.get("task", "train") == "train"
    )


def list_adapters(volume_dir: Path, *, limit: int = 200) -> tuple[list[AdapterEntry], list[str]]:
    """(adapters newest first, at most `limit`; job folders whose result.json could not be read)."""
    jobs = Path(volume_dir) / "jobs"
    entries: list[AdapterEntry] = []
    skipped: list[str] = []
    for path in sorted(jobs.glob("*/result.json")) if jobs.is_dir() else []:
        result = read_json(path)
        if not isinstance(result, dict):
            skipped.append(f"{path.parent.name}: result.json is not readable JSON")
            continue
        if not is_trained_adapter(result):
            continue
        try:
            entries.append(adapter_entry(result, path.parent))
        except (ValueError, TypeError, AttributeError) as err:
            skipped.append(f"{path.parent.name}: result.json has an unexpected shape ({err})")
    entries.sort(key=lambda e: (e.trained_at or "", e.job_id), reverse=True)
    return entries[:limit], skipped


def adapter_entry(result: dict[str, Any], job_dir: Path) -> AdapterEntry:
    """One list row from a stored result, with the adapter's own config filling what it lacks."""
    lineage = _dict(result.get("lineage"))
    base = _dict(lineage.get("base_model"))
    dataset_lineage = _dict(lineage.get("dataset"))
    summary = _dict(result.get("dataset"))
    archive = _dict(result.get("adapter"))
    adapter_path = Path(archive.get("path") or result.get("lora_artifact_path") or job_dir / "adapter")
    config = read_json(adapter_path / "adapter_config.json")
    config = config if isinstance(config, dict) else {}
    attempts = [a for a in result.get("attempts") or [] if isinstance(a, dict)]
    previous = _dict(lineage.get("previous_adapter"))
    return AdapterEntry(
        job_id=str(result.get("job_id") or job_dir.name),
        trained_at=attempts[0].get("started_at") if attempts else None,
        base_model=base.get("model_id") or config.get("base_model_name_or_path"),
        base_revision=base.get("revision") or config.get("revision"),
        dataset=DatasetRef(
            name=dataset_lineage.get("name") or summary.get("name"),
            version=dataset_lineage.get("version") or summary.get("version"),
            file_name=dataset_lineage.get("file_name"),
            sha256=dataset_lineage.get("sha256"),
            conversations=dataset_lineage.get("conversations") or summary.get("conversations"),
            pairs=dataset_lineage.get("pairs") or summary.get("pairs"),
        ),
        verdict=result.get("verdict"),
        headline=_dict(result.get("outcome")).get("reason"),
        metrics={k: v for k, v in _dict(result.get("metrics")).items() if k in KEY_METRICS},
        lora_r=config.get("r"),
        adapter_path=str(adapter_path),
        adapter_present=(adapter_path / "adapter_model.safetensors").is_file(),
        archive=archive.get("archive"),
        archive_sha256=archive.get("sha256"),
        size_bytes=archive.get("size_bytes"),
        previous_adapter=previous.get("job_id") or previous.get("path"),
        lineage=lineage or None,
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def run_list(
    job_input: Any,
    *,
    settings: Settings | None = None,
    default_job_id: str | None = None,
) -> dict:
    """The `list` task as the handler runs it: RunPod's output (a failure in the same shape)."""
    settings = settings or Settings.from_env()
    try:
        spec = parse_list_input(job_input, runpod_job_id=default_job_id)
    except JobInputError as err:
        job_id = job_input.get("job_id") if isinstance(job_input, dict) else None
        return ListResult(
            job_id=job_id if isinstance(job_id, str) else default_job_id,
            status="failed", stage="queued", error=str(err), error_message=str(err),
        ).to_output()  # fmt: skip
    adapters, skipped = list_adapters(settings.volume_dir, limit=spec.limit)
    return ListResult(
        job_id=spec.job_id, status="completed", stage="completed", adapters=adapters, count=len(adapters),
        skipped=skipped,
    ).to_output()  # fmt: skip
