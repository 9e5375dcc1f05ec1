"""The job's evidence, assembled: the typed report, its files, the adapter's model card and licence
notice, the vLLM serving check, and the archive that ships them with the adapter."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from safetensors import safe_open

from lora_worker.runtime.contracts import AdapterFiles, Metrics, Outcome, Report, ReportFiles
from lora_worker.runtime.data import PreparedData
from lora_worker.runtime.delivery.archive import archive_dir
from lora_worker.runtime.delivery.card import CardFacts, licence_files_in, write_card, write_notice
from lora_worker.runtime.delivery.lineage import Lineage
from lora_worker.runtime.delivery.report import write_report
from lora_worker.runtime.delivery.serving import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ServingCheck,
    require_servable,
)
from lora_worker.runtime.device import Device, peak_memory_gib
from lora_worker.runtime.evaluation import human_sheet
from lora_worker.runtime.evaluation.assess import Assessment
from lora_worker.runtime.evaluation.loss import HeldOutLoss, perplexity
from lora_worker.runtime.files import read_json
from lora_worker.runtime.jobdir import AttemptLog, JobPaths
from lora_worker.runtime.spec import JobSpec
from lora_worker.runtime.training.callbacks import history_from_log
from lora_worker.runtime.training.trainer import TrainOutcome


def package_outputs(
    spec: JobSpec,
    paths: JobPaths,
    data: PreparedData,
    outcome: TrainOutcome,
    assessment: Assessment,
    adapter: Path,
    lineage: Lineage,
    attempt: AttemptLog,
    device: Device,
    model_info: dict,
    warnings: list[str],
    timings: dict[str, float],
) -> tuple[Report, ReportFiles, AdapterFiles]:
    """Write the report, check the adapter against vLLM (NotServable when it would not load), write
    its model card, archive adapter + report, and write the report again naming the archive (the
    copy on the volume names the archive; the archived copy cannot name itself). The human A/B key
    stays beside the report, out of the archive."""
    report = build_report(
        spec, data, outcome, assessment, lineage, attempt, device, model_info, warnings, timings
    )
    key = paths.root / human_sheet.KEY_NAME
    write_report(paths.report, report.model_dump(mode="json"), human_key_path=key)
    serving = require_servable(adapter, lora_name=spec.job_id or "adapter")
    write_adapter_card(adapter, report, serving, assessment.versus_previous)
    archive = archive_dir({"adapter": adapter, "report": paths.report}, paths.archive)
    files = AdapterFiles(
        path=str(adapter), archive=archive["path"], sha256=archive["sha256"], size_bytes=archive["size_bytes"]
    )
    report = report.model_copy(update={"adapter": files})
    written = write_report(paths.report, report.model_dump(mode="json"), human_key_path=key)
    return report, ReportFiles(**{k: str(v) for k, v in written.items()}), files


def build_report(
    spec: JobSpec,
    data: PreparedData,
    outcome: TrainOutcome,
    assessment: Assessment,
    lineage: Lineage,
    attempt: AttemptLog,
    device: Device,
    model_info: dict,
    warnings: list[str],
    timings: dict[str, float],
) -> Report:
    a = assessment
    eval_s = timings.get("eval_before", 0.0) + timings.get("evaluate", 0.0)
    return Report(
        job_id=spec.job_id,
        status="completed",
        verdict=a.verdict.verdict,
        headline=a.verdict.reason,
        outcome=a.verdict,
        base_model=lineage.base_model.model_id,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        resumed=outcome.resumed_from_step is not None or bool(attempt.previous),
        attempts=attempt.all(),
        dataset=data.summary.as_dict(),
        settings={
            **spec.hyperparameters.model_dump(),
            **spec.training.model_dump(),
            "micro_batch_tokens": outcome.micro_batch_tokens,
            "gradient_accumulation_steps": outcome.gradient_accumulation_steps,
            "optimizer_used": outcome.optimizer,
            "liger_used": bool(model_info.get("liger")),
            "sharded_over": model_info.get("sharded_over", 1),  # FSDP ranks holding the model (1: whole)
            "trainable_params": model_info.get("trainable_params"),
            "device": device.kind,
            "gpu": device.name,
        },
        metrics=metrics_from(outcome, a, data, peak_memory_gib()),
        history=_history(outcome, a.before, a.after),
        samples=a.samples,
        lineage=lineage.model_dump(mode="json"),
        versus_previous=a.versus_previous,
        evidence=a.evidence,
        timings_s=dict(timings),
        gpu=device.name,
        gpu_seconds=attempt.total_seconds(),
        cost_usd=attempt.total_cost(),
        eval_cost_usd=round(eval_s / 3600 * attempt.hourly, 4),
        warnings=list(dict.fromkeys(warnings)),
    )


def metrics_from(outcome: TrainOutcome, a: Assessment, data: PreparedData, peak_gib: float | None) -> Metrics:
    b, after, prev = (x.mean if x else None for x in (a.before, a.after, a.previous))
    tokens_this_run = int(outcome.epochs_this_run * data.summary.tokens_total)  # the rate: this attempt only
    return Metrics(
        train_loss=outcome.train_loss,
        eval_loss_before=b,
        eval_loss_after=after,
        eval_loss_previous=prev,
        perplexity_before=perplexity(b),
        perplexity_after=perplexity(after),
        steps=outcome.global_step,
        total_steps=outcome.max_steps,
        epochs=round(outcome.epoch, 4),
        tokens_trained=int(outcome.epoch * data.summary.tokens_total),
        tokens_per_second=round(tokens_this_run / outcome.train_seconds, 1)
        if outcome.train_seconds
        else None,
        peak_gpu_memory_gib=peak_gib,
        padding_fraction=outcome.padding_fraction,
    )


def _history(outcome: TrainOutcome, before: HeldOutLoss | None, after: HeldOutLoss | None) -> dict:
    """The training curve, and the held-out curve from the base model (step 0) to the final adapter."""
    h = history_from_log(outcome.log_history)
    evals = [e for e in h["eval"] if e["step"] not in (0, outcome.global_step)]
    if before is not None:
        evals.insert(0, {"step": 0, "eval_loss": before.mean})
    if after is not None:
        evals.append({"step": outcome.global_step, "eval_loss": after.mean})
    return {"train": h["train"], "eval": evals}


def write_adapter_card(
    adapter: Path, report: Report, serving: ServingCheck, versus_previous: Outcome | None = None
) -> Path:
    """The model card (README.md) and, for a Llama 3 base, NOTICE, in the adapter folder."""
    config = read_json(adapter / ADAPTER_CONFIG) or {}
    base = str(config.get("base_model_name_or_path") or report.base_model)
    write_notice(adapter, base)
    facts = CardFacts(
        job_id=report.job_id,
        base_model=base,
        base_revision=config.get("revision"),
        lora=config,
        weights_dtype=weights_dtype(adapter / ADAPTER_WEIGHTS),
        verdict=report.verdict,
        headline=report.headline,
        metrics=report.metrics.model_dump(mode="json"),
        dataset=report.dataset,
        lineage=report.lineage,
        versus_previous=versus_previous.model_dump(mode="json") if versus_previous else None,
        serving=serving.model_dump(mode="json"),
        licence_files=licence_files_in(adapter),
        created_at=report.created_at,
    )
    return write_card(adapter, facts)


def weights_dtype(weights: Path) -> str:
    """bf16 / fp32 / ...: the dtype of the adapter's tensors (from the file's header only)."""
    names = {"BF16": "bf16", "F32": "fp32", "F16": "fp16"}
    with safe_open(str(weights), framework="pt") as f:
        kinds = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return "/".join(sorted(names.get(k, k.lower()) for k in kinds)) or "none"
