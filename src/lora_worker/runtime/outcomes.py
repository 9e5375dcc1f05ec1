"""How a job ends: one `JobResult` per kind of ending, and the one place it is written and announced.

`finish` writes `result.json` and sends the final event; it cannot itself fail the job: a full or
read-only volume costs the file, never the RunPod result or the final event. A completed job's
stored result is never overwritten by a later delivery that fails or is cancelled.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, is_dataclass
from typing import Any

from lora_worker.runtime.contracts import AdapterFiles, JobResult, Report, ReportFiles
from lora_worker.runtime.data import DatasetError, PreparedData
from lora_worker.runtime.delivery.serving import NotServable
from lora_worker.runtime.device import Device, NoGpuError
from lora_worker.runtime.events.progress import CostMeter, Reporter
from lora_worker.runtime.events.webhooks import WebhookSender, secret_key
from lora_worker.runtime.files import DiskSpaceError, atomic_write_json
from lora_worker.runtime.jobdir import AttemptLog, JobPaths, claim, stored_result
from lora_worker.runtime.model.layout import ModelResolutionError
from lora_worker.runtime.model.prepare import WarmStartRefused
from lora_worker.runtime.model.resolve import ModelMeta
from lora_worker.runtime.net import UrlNotAllowed, check_url
from lora_worker.runtime.plan import Plan
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError, JobSpec
from lora_worker.runtime.tasks.adapter_source import AdapterSourceError
from lora_worker.runtime.training.checkpoints import kept_note
from lora_worker.runtime.training.trainer import TrainOutcome
from lora_worker.runtime.volume_lock import LockTimeoutError

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A failure with a message meant for the person who sent the job."""


class JobCancelled(RuntimeError):
    """/cancel arrived; the job stops at the next stage boundary (within one step while training)."""


# Errors whose message is already written for the sender; others are prefixed with their type.
_READABLE = (
    JobFailed,
    DatasetError,
    JobInputError,
    ModelResolutionError,
    DiskSpaceError,
    NoGpuError,
    LockTimeoutError,
    WarmStartRefused,
    AdapterSourceError,
    NotServable,
)


def describe(err: BaseException) -> str:
    if isinstance(err, _READABLE):
        return str(err)
    name = type(err).__name__
    if "OutOfMemory" in name or "NonFiniteLoss" in name:
        return str(err)
    return f"{name}: {err}"


def stop_if_cancelled(cancel: threading.Event) -> None:
    """Between stages: a /cancel that came outside training stops here (training checks each step)."""
    if cancel.is_set():
        raise JobCancelled()


def check_webhook_secret(spec: JobSpec, settings: Settings) -> None:
    """A webhook_url needs a usable WEBHOOK_SECRET on the worker: unsigned webhooks are never sent."""
    if not spec.webhook_url:
        return
    if not settings.webhook_secret:
        raise JobInputError(
            [
                "webhook_url: the worker has no WEBHOOK_SECRET set, and unsigned webhooks are not sent; "
                "set WEBHOOK_SECRET in the endpoint's environment or leave webhook_url out"
            ]
        )
    try:
        secret_key(settings.webhook_secret)
    except ValueError:
        raise JobInputError(
            [
                "WEBHOOK_SECRET: the worker's secret is not usable (a whsec_ secret must be 'whsec_' "
                "followed by base64); fix it in the endpoint's environment"
            ]
        ) from None


def check_training(outcome: TrainOutcome, paths: JobPaths) -> None:
    """Training that stopped early, or whose adapter never moved, is not a completed job."""
    if outcome.stopped_reason == "cancelled":
        raise JobCancelled()
    if outcome.stopped_reason:
        raise JobFailed(
            f"training stopped at step {outcome.global_step}: {outcome.stopped_reason}"
            + kept_note(paths.checkpoints)
        )
    if outcome.adapter_update_norm == 0.0:
        raise JobFailed(
            f"the adapter did not change: {outcome.global_step} optimizer step(s) left every LoRA weight at "
            "its initial value, so the result would be the base model. Train more steps (more epochs, "
            "smaller micro-batches) or raise learning_rate."
        )


# -------------------------------------------------------------------------------- the endings


def completed(
    spec: JobSpec,
    report: Report,
    files: ReportFiles,
    archive: AdapterFiles,
    outcome: TrainOutcome,
    merged: dict | None,
    uploads: dict,
    warnings: list[str],
    timings: dict[str, float],
) -> JobResult:
    return JobResult(
        job_id=spec.job_id,
        status="completed",
        stage="completed",
        verdict=report.verdict,
        outcome=report.outcome,
        lora_artifact_path=archive.path,
        adapter=archive,
        report=files,
        metrics=report.metrics,
        dataset=report.dataset,
        lineage=report.lineage,
        versus_previous=report.versus_previous,
        evidence=report.evidence.brief() if report.evidence else None,
        timings_s=timings,
        resumed_from_step=outcome.resumed_from_step,
        recoveries=[_recovery(r) for r in outcome.recoveries],
        uploads=uploads,
        merged=merged,
        warnings=list(dict.fromkeys(warnings)),
    )


def dry_run(
    spec: JobSpec, data: PreparedData, plan: Plan, meta: ModelMeta, warnings: list[str], timings: dict
) -> JobResult:
    return JobResult(
        job_id=spec.job_id,
        status="completed",
        stage="preprocessing",
        dry_run=True,
        verdict="not_measured",
        message="dry run: the input and dataset are valid; nothing was trained",
        dataset=data.summary.as_dict(),
        plan={
            **plan.model_dump(),
            "model": {"id": meta.model_id, "revision": meta.revision, "source": meta.source},
        },
        timings_s=timings,
        warnings=list(dict.fromkeys(warnings)),
    )


def replay(stored: dict) -> JobResult:
    """A completed job delivered again: its stored result, unchanged."""
    try:
        return JobResult.model_validate(stored).model_copy(update={"replayed": True})
    except ValueError:  # written by an older worker with other fields: say where it is
        return JobResult(
            job_id=stored.get("job_id"),
            status="completed",
            stage="completed",
            replayed=True,
            message="this job already completed; its stored result is in result.json",
            lora_artifact_path=stored.get("lora_artifact_path"),
        )


def cancelled(
    spec: JobSpec, paths: JobPaths, reporter: Reporter, warnings: list[str], timings: dict
) -> JobResult:
    where = f"cancelled during {reporter.current_stage}"
    message = where + kept_note(paths.checkpoints, none=", before any checkpoint")
    return JobResult(
        job_id=spec.job_id,
        status="cancelled",
        stage=reporter.current_stage,
        message=message,
        timings_s=timings,
        warnings=list(dict.fromkeys(warnings)),
    )


def failed(
    spec: JobSpec | None, stage: str, err: BaseException, warnings: list[str], timings: dict
) -> JobResult:
    text = describe(err)
    return JobResult(
        job_id=spec.job_id if spec else None,
        status="failed",
        stage=stage,
        error=text,
        error_message=text,
        timings_s=timings,
        warnings=list(dict.fromkeys(warnings)),
    )


def group_ended(spec: JobSpec, end: Any) -> JobResult:
    """A multi-GPU job whose process group ended without rank 0's result (`end`: parallel.launch.GroupEnd):
    a rank died or failed, or /cancel had to stop the group; the message names the rank and where."""
    if end.cancelled:
        return JobResult(job_id=spec.job_id, status="cancelled", stage=end.stage, message=end.message)
    return JobResult(
        job_id=spec.job_id, status="failed", stage=end.stage, error=end.message, error_message=end.message
    )


def refused(job_id: str, message: str, device: Device) -> dict:
    """A delivery that may not run (job busy elsewhere, or completed with other input): RunPod only."""
    return JobResult(
        job_id=job_id, status="failed", stage="queued", error=message, error_message=message, gpu=device.name
    ).to_output()


# -------------------------------------------------------------------------------- finishing


def finish(
    result: JobResult, paths: JobPaths, reporter: Reporter, attempt: AttemptLog, *, drain_s: float
) -> dict:
    """Write result.json and send the final event; returns RunPod's output. Never raises for I/O."""
    if result.replayed:
        output = result.to_output()
        reporter.stage("completed", output=output, lora_artifact_path=result.lora_artifact_path)
        reporter.close(drain_s)
        return output
    if result.status != "completed" and stored_result(paths) is not None:
        # a later delivery of a completed job that failed before it could replay: nothing of the
        # job is touched (result.json, attempts, webhooks), the answer goes to this request only
        return result.to_output()
    attempt.record(result.status)
    result = result.model_copy(
        update={
            "attempts": attempt.all(),
            "gpu": attempt.gpu,
            "gpu_seconds": attempt.total_seconds(),
            "cost_usd": attempt.total_cost(),
            "timings_s": {**result.timings_s, "total": round(attempt.seconds(), 2)},
        }
    )
    output = result.to_output()
    try:
        atomic_write_json(paths.result, output)
    except OSError as err:  # a full or read-only volume: the result still goes out
        log.error("job %s: could not write %s: %s", result.job_id, paths.result, err)
        output["warnings"] = [*output["warnings"], f"result.json could not be written on the volume: {err}"]
    reporter.stage(
        result.status,
        output=output if result.status == "completed" else None,
        lora_artifact_path=result.lora_artifact_path,
        error_message=result.error_message or (result.message if result.status == "cancelled" else None),
        verdict={"verdict": result.verdict} if result.verdict else None,
        warnings=result.warnings or None,
    )
    reporter.close(drain_s)
    return output


def input_failure(raw: Any, err: JobInputError, settings: Settings, runpod_id: str | None) -> dict:
    """Invalid input: the same failure shape, with result.json and a final webhook when the job id
    is known, its folder is free and it holds no completed job."""
    result = JobResult(
        job_id=_job_id_of(raw, runpod_id),
        status="failed",
        stage="queued",
        error=str(err),
        error_message=str(err),
    )
    output = result.to_output()
    if result.job_id is None:
        return output
    paths = JobPaths(settings.job_dir(result.job_id), result.job_id)
    try:
        with claim(paths, wait_s=0, stale_s=settings.job_lock_stale_s):
            if stored_result(paths) is not None:
                return output
            atomic_write_json(paths.result, output)
            _webhook_failure(raw, result, settings, output)
    except (LockTimeoutError, OSError, RuntimeError) as e:
        log.warning("job %s: input error not recorded on the volume: %s", result.job_id, e)
    return output


def _webhook_failure(raw: Any, result: JobResult, settings: Settings, output: dict) -> None:
    url = raw.get("webhook_url") if isinstance(raw, dict) else None
    if not (isinstance(url, str) and settings.webhook_secret):
        return
    try:
        check_url(url)
        sender = WebhookSender(url, settings.webhook_secret)
    except (UrlNotAllowed, ValueError):
        return
    reporter = Reporter(str(result.job_id), meter=CostMeter(0.0), channels=[sender])
    reporter.stage("failed", error_message=result.error_message)
    reporter.close(10.0)


def _job_id_of(raw: Any, runpod_id: str | None) -> str | None:
    candidates = [raw.get("job_id")] if isinstance(raw, dict) and isinstance(raw.get("job_id"), str) else []
    for candidate in [*candidates, runpod_id]:
        try:
            if candidate is not None:
                return JobSpec._safe_job_id(candidate)
        except ValueError:
            continue
    return None


def _recovery(r: Any) -> dict[str, Any]:
    return asdict(r) if is_dataclass(r) else dict(r)
