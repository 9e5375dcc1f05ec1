"""Delivery beyond the volume: the archive to a presigned URL, the adapter to the Hub, and the
optional bf16 merge. A failed delivery never fails the job: the adapter stays on the volume and the
result says where."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lora_worker.runtime.contracts import AdapterFiles
from lora_worker.runtime.delivery.upload import upload_presigned, upload_to_hf_hub
from lora_worker.runtime.jobdir import JobPaths
from lora_worker.runtime.model.load import available_ram_bytes, merge_adapter, merge_problem, weights_bytes
from lora_worker.runtime.model.resolve import ResolvedModel
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobSpec


def deliver(
    spec: JobSpec, settings: Settings, archive: AdapterFiles, adapter: Path, warnings: list[str]
) -> dict:
    out = spec.output
    results: dict[str, Any] = {}
    if out.upload_url:
        results["presigned"] = upload_presigned(Path(archive.archive), out.upload_url, sha256=archive.sha256)
    if out.hf_repo:
        if not settings.hf_token:
            results["hf_hub"] = {
                "ok": False,
                "repo_id": out.hf_repo,
                "error": "HF_TOKEN is not set on the worker",
            }
        else:
            results["hf_hub"] = upload_to_hf_hub(
                adapter,
                out.hf_repo,
                token=settings.hf_token,
                endpoint=settings.hf_endpoint,
                commit_message=f"LoRA adapter from job {spec.job_id}",
            )
    warnings += [
        f"upload to {k} failed: {v.get('error')}; the adapter is on the volume at {adapter}"
        for k, v in results.items()
        if not v.get("ok")
    ]
    return results


def merge_if_asked(
    spec: JobSpec, weights: ResolvedModel, paths: JobPaths, warnings: list[str]
) -> dict | None:
    """The adapter merged into the original bf16 weights, when `output.merge` asks and RAM and disk allow."""
    if not spec.output.merge:
        return None
    need = weights_bytes(weights.path)
    problem = merge_problem(
        need, ram_bytes=available_ram_bytes(), disk_bytes=shutil.disk_usage(paths.root).free
    )
    if problem:
        warnings.append(problem)
        return {"ok": False, "error": problem}
    out = merge_adapter(weights.path, paths.adapter, paths.root / "merged")
    return {"ok": True, "path": str(out), "size_bytes": weights_bytes(out)}
