"""`run_job`: one training job, told as one story.

    parse spec -> claim the job folder -> fetch the dataset -> reuse or refuse (resubmission)
    -> load conversations -> model config and tokenizer only -> tokenize, split -> plan
    (dry_run ends here: no weight file touched) -> weights -> load NF4 + LoRA -> held-out loss
    -> train -> held-out loss, samples, verdict -> save adapter -> report, archive -> upload

Every stage is a function of its own module with explicit inputs and outputs (docs/design.md).
With more than one GPU (`distributed.num_processes`), `run_job` launches the job's process group
(runtime/parallel/) and its rank 0 tells this same story through `run_claimed`; the other ranks
join for training only.
Every ending, failures included, is one `JobResult` shape, written to `jobs/<job_id>/result.json`
and sent as the final event, except for a delivery that is refused because the job is running
elsewhere or already completed with other input: that one touches nothing of the job.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lora_worker.runtime import jobdir, outcomes, redaction
from lora_worker.runtime.contracts import JobResult
from lora_worker.runtime.data import (
    FetchedDataset,
    PreparedData,
    PreprocessingCancelled,
    fetch_dataset,
    load_dataset,
    prepare_dataset,
)
from lora_worker.runtime.delivery.adapter import base_identity, save_adapter
from lora_worker.runtime.delivery.deliver import deliver, merge_if_asked
from lora_worker.runtime.delivery.lineage import Lineage, build_lineage
from lora_worker.runtime.delivery.package import package_outputs
from lora_worker.runtime.device import Device, detect_device, free_accelerator_memory, require_cuda
from lora_worker.runtime.evaluation.assess import assess
from lora_worker.runtime.evaluation.evidence import JudgeSettings
from lora_worker.runtime.evaluation.loss import HeldOutLoss, held_out_loss
from lora_worker.runtime.evaluation.scenarios import load_scenarios
from lora_worker.runtime.events.progress import CostMeter, Reporter
from lora_worker.runtime.events.runpod_status import RunPodChannel
from lora_worker.runtime.events.webhooks import WebhookSender
from lora_worker.runtime.jobdir import AttemptLog, JobPaths, JobRefused
from lora_worker.runtime.model.load import load_tokenizer
from lora_worker.runtime.model.prepare import LoadedModel, check_warm_start, load_checked
from lora_worker.runtime.model.resolve import ModelMeta, resolve_model_meta, resolve_model_weights
from lora_worker.runtime.outcomes import JobCancelled
from lora_worker.runtime.parallel.handoff import Group, Handoff
from lora_worker.runtime.parallel.launch import events_sent, gpu_label, group_size, launch_group
from lora_worker.runtime.parallel.rundir import LaunchRequest
from lora_worker.runtime.plan import Plan, eval_token_budget, plan_job, train_config
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError, JobSpec, parse_job_input
from lora_worker.runtime.training.checkpoints import ResumePoint, find_resumable, prune_checkpoints
from lora_worker.runtime.training.ranks import GroupOutOfMemory
from lora_worker.runtime.training.run import run_training
from lora_worker.runtime.training.trainer import TrainConfig

log = logging.getLogger(__name__)

# How long the end of a job may wait for webhook and /status receivers (seconds): a receiver that
# never answers cannot hold the worker longer than this.
WEBHOOK_DRAIN_S = 30.0


@dataclass
class Stopwatch:
    """Seconds per stage, in the order the stages ran."""

    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - t, 2)


def run_job(
    job_input: Any,
    *,
    settings: Settings | None = None,
    runpod_job: dict | None = None,
    cancel: threading.Event | None = None,
    channels: tuple = (),
    default_job_id: str | None = None,
    runpod_send: Callable | None = None,
) -> dict:
    """Run one job to its end and return its output (RunPod's `{"error": ...}` shape on failure).

    `channels` are extra event receivers (tests); `runpod_send` replaces the HTTP send of the
    RunPod `/status` channel (tests).
    """
    settings = settings or Settings.from_env()
    redaction.install(settings.secrets())
    cancel = cancel or threading.Event()
    runpod_id = (runpod_job or {}).get("id", default_job_id)
    try:
        spec = parse_job_input(job_input, runpod_job_id=runpod_id)
        outcomes.check_webhook_secret(spec, settings)
        device = detect_device()
        processes = group_size(spec, device)
    except JobInputError as err:
        return outcomes.input_failure(job_input, err, settings, runpod_id)
    paths = JobPaths(settings.job_dir(spec.job_id), spec.job_id)
    announce = dict(runpod_job=runpod_job, channels=channels, runpod_send=runpod_send)
    try:
        with jobdir.claim(paths, wait_s=settings.job_lock_wait_s, stale_s=settings.job_lock_stale_s):
            if processes > 1 and not spec.dry_run:  # a dry run trains nothing: its plan is made here
                request = LaunchRequest(job_input, runpod_job, default_job_id, processes)
                return run_group(request, spec, paths, device, settings, cancel, **announce)
            return run_claimed(spec, paths, device, settings, cancel=cancel, processes=processes, **announce)
    except JobRefused as err:
        log.warning("job %s: %s", spec.job_id, err)
        return outcomes.refused(spec.job_id, str(err), device)


def run_claimed(
    spec: JobSpec,
    paths: JobPaths,
    device: Device,
    settings: Settings,
    *,
    runpod_job: dict | None,
    cancel: threading.Event,
    channels: tuple = (),
    runpod_send: Callable | None = None,
    processes: int = 1,
    group: Group | None = None,
    held_s: float = 0.0,
) -> dict:
    """The job in this process, its folder already claimed (by this process, or by the worker that
    launched this process group, whose rank 0 this is): every ending written and announced.
    `held_s`: how long the job's GPUs were already held when this process started (the group's start)."""
    attempt = AttemptLog(
        paths, hourly_usd=settings.hourly_rate(device.name) * processes, gpu=gpu_label(device, processes)
    )
    attempt.t0 -= held_s  # the time (and cost) of the group's start-up counts too
    reporter = open_reporter(spec, settings, attempt, runpod_job, channels, runpod_send)
    result = attempt_job(spec, paths, device, reporter, attempt, settings, cancel, processes, group)
    free_accelerator_memory()  # the job's model is unreferenced now: hand the GPU back
    return outcomes.finish(result, paths, reporter, attempt, drain_s=WEBHOOK_DRAIN_S)


def run_group(
    request: LaunchRequest,
    spec: JobSpec,
    paths: JobPaths,
    device: Device,
    settings: Settings,
    cancel: threading.Event,
    *,
    runpod_job: dict | None,
    channels: tuple,
    runpod_send: Callable | None,
) -> dict:
    """The job on `request.processes` GPUs: rank 0's output, or, when the group ended without one, its
    failure (or cancel) written and announced here, naming the rank and where it was."""
    # the whole group's time, recorded only when the group leaves no result (rank 0 records its own)
    attempt = AttemptLog(
        paths,
        hourly_usd=settings.hourly_rate(device.name) * request.processes,
        gpu=gpu_label(device, request.processes),
    )
    end = launch_group(request, paths, settings, cancel=cancel, max_seconds=spec.max_duration_hours * 3600)
    if end.output is not None:
        return end.output
    attempt.last_sequence = max(attempt.last_sequence, events_sent(paths))
    reporter = open_reporter(spec, settings, attempt, runpod_job, channels, runpod_send)
    return outcomes.finish(outcomes.group_ended(spec, end), paths, reporter, attempt, drain_s=WEBHOOK_DRAIN_S)


def attempt_job(
    spec: JobSpec,
    paths: JobPaths,
    device: Device,
    reporter: Reporter,
    attempt: AttemptLog,
    settings: Settings,
    cancel: threading.Event,
    processes: int = 1,
    group: Group | None = None,
) -> JobResult:
    """This delivery's attempt at the job: the story, with every ending turned into a result (except
    an out-of-memory error in a process group, which relaunches the group)."""
    watch, warnings = Stopwatch(), []
    try:
        return train_job(
            spec, paths, device, reporter, attempt, settings, cancel, watch, warnings, processes, group
        )  # fmt: skip
    except (JobRefused, GroupOutOfMemory):
        raise
    except (JobCancelled, PreprocessingCancelled):
        return outcomes.cancelled(spec, paths, reporter, warnings, watch.timings)
    except Exception as err:  # every failure ends as a readable `failed`, never a bare traceback
        log.error("job %s failed:\n%s", spec.job_id, traceback.format_exc())
        return outcomes.failed(spec, reporter.current_stage, err, warnings, watch.timings)


@dataclass(frozen=True)
class Prepared:
    """Everything decided before any weight file is touched."""

    dataset: FetchedDataset
    resume: ResumePoint
    data: PreparedData
    tokenizer: Any
    meta: ModelMeta
    scenarios: list | None
    judge: JudgeSettings
    cfg: TrainConfig
    plan: Plan
    lineage: Lineage


def train_job(
    spec: JobSpec,
    paths: JobPaths,
    device: Device,
    reporter: Reporter,
    attempt: AttemptLog,
    settings: Settings,
    cancel: threading.Event,
    watch: Stopwatch,
    warnings: list[str],
    processes: int = 1,
    group: Group | None = None,
) -> JobResult:
    """The job, top to bottom. Raises on failure; returns the completed (or replayed) result."""
    if settings.require_cuda:
        require_cuda(device)
    with watch("dataset_fetch"):  # before any event: a refused resubmission must not touch the job
        dataset = fetch_dataset(
            url=spec.dataset_url, path=spec.dataset_path, dest_dir=paths.dataset,
            volume_dir=settings.volume_dir, should_stop=cancel.is_set,
        )  # fmt: skip
    resume = find_resumable(paths.checkpoints)
    fingerprint = jobdir.fingerprint(spec, dataset.sha256)
    stored = jobdir.check_resubmission(paths, fingerprint, has_checkpoint=resume.checkpoint is not None)
    if stored is not None:
        return outcomes.replay(stored)
    attempt.resumed_from_step = resume.step
    p = prepare(spec, paths, dataset, resume, device, reporter, settings, cancel, watch, warnings, processes)
    if spec.dry_run:
        return outcomes.dry_run(spec, p.data, p.plan, p.meta, warnings, watch.timings)
    outcomes.stop_if_cancelled(cancel)
    reporter.stage("downloading_model")
    with watch("model_download"):
        weights = resolve_model_weights(
            p.meta, volume_dir=settings.volume_dir, hf_token=settings.hf_token,
            hf_endpoint=settings.hf_endpoint, on_progress=lambda d: reporter.progress(download=d),
        )  # fmt: skip
    outcomes.stop_if_cancelled(cancel)
    reporter.stage("model_loading")
    measure = held_out_measure(p.data, spec, p.tokenizer.pad_token_id)
    shard_over = processes if p.plan.parallel_mode == "fsdp" else 1
    handoff = Handoff(weights, spec, p.data.train, p.tokenizer.pad_token_id, p.cfg, resume, shard_over)
    if group is not None and shard_over > 1:  # sharded: every rank loads its share beside this one
        group.hand_off(handoff)
    first_eval = baseline(reporter, device, watch, measure, group)
    loaded, before = load_checked(weights, p.tokenizer, spec, settings.volume_dir, first_eval, shard_over)
    model = loaded.model
    watch.timings.update({f"model_{k}": v for k, v in loaded.timings.items()})
    warnings += loaded.warnings
    reporter.baseline(before.mean if before else None)
    outcomes.stop_if_cancelled(cancel)
    reporter.stage("training", resumed_from_step=resume.step)
    if group is not None:  # the other ranks train beside this one (data parallel: load first)
        group.start_training(handoff)
    with watch("train"):
        outcome = run_training(
            model, p.data, p.tokenizer.pad_token_id, p.cfg, spec, reporter=reporter, cancel=cancel,
            resume=resume, evaluate=lambda: mean_of(measure(model)), eval_every_steps=ev_steps(spec, p.plan),
            elapsed=attempt.seconds, hourly_usd=attempt.hourly, prior_cost_usd=attempt.total_cost() - attempt.cost(),
            ranks=group.ranks if group else None, recoveries=group.recoveries if group else (),
        )  # fmt: skip
    if group is not None:
        group.training_ended()
    warnings += outcome.warnings
    outcomes.check_training(outcome, paths)
    reporter.stage("evaluating")
    with watch("evaluate"):
        assessment = assess(
            model, p.tokenizer, p.data, spec, before, measure=measure, previous_adapter=loaded.init_adapter,
            judge_settings=p.judge, scenarios=p.scenarios, device=device, warnings=warnings,
            should_stop=cancel.is_set,
        )  # fmt: skip
    outcomes.stop_if_cancelled(cancel)
    reporter.stage("saving")
    with watch("save"):
        base = base_identity(weights.model_id, weights.revision, weights.path)
        gathered = group.gather(model) if group is not None else None
        adapter = save_adapter(
            model, p.tokenizer, paths.adapter, base=base, dtype=spec.output.adapter_dtype, weights=gathered
        )
    if spec.output.merge:
        reporter.stage("merging")
    with watch("merge"):
        merged = merge_if_asked(spec, weights, paths, warnings)
    reporter.stage("reporting")
    with watch("report"):
        report, files, archive = package_outputs(
            spec, paths, p.data, outcome, assessment, adapter, p.lineage, attempt, device,
            loaded.info(device.name), warnings, watch.timings,
        )  # fmt: skip
    if spec.output.upload_url or spec.output.hf_repo:
        reporter.stage("uploading")
    with watch("upload"):
        uploads = deliver(spec, settings, archive, adapter, warnings)
    if not keeps_checkpoints(spec, settings):  # adapter, report, result and archive stay
        prune_checkpoints(paths.checkpoints)
    return outcomes.completed(spec, report, files, archive, outcome, merged, uploads, warnings, watch.timings)


def prepare(
    spec: JobSpec,
    paths: JobPaths,
    dataset: FetchedDataset,
    resume: ResumePoint,
    device: Device,
    reporter: Reporter,
    settings: Settings,
    cancel: threading.Event,
    watch: Stopwatch,
    warnings: list[str],
    processes: int = 1,
) -> Prepared:
    """Conversations, scenarios, the model's config and tokenizer, a warm start's adapter, the
    tokenized data and the plan: everything decided before any weight file is touched."""
    hp, ev, stop = spec.hyperparameters, spec.evaluation, cancel.is_set
    reporter.stage("queued")
    reporter.stage("fetching_dataset")
    with watch("dataset_load"):
        loaded = load_dataset(
            dataset.path, spec.dataset_format, fold=spec.training.fold_conversations,
            min_quality_score=spec.data.min_quality_score, should_stop=stop,
            on_progress=counting(reporter, "reading conversations"),
        )  # fmt: skip
        scenarios = load_scenarios(
            path=ev.scenarios_path, url=ev.scenarios_url, dest_dir=paths.root / "scenarios",
            volume_dir=settings.volume_dir, should_stop=stop,
        )  # fmt: skip
    reporter.stage("resolving_model")
    with watch("model_config"):
        meta = resolve_model_meta(
            spec.base_model, revision=spec.base_model_revision, volume_dir=settings.volume_dir,
            hf_token=settings.hf_token, hf_endpoint=settings.hf_endpoint,
        )  # fmt: skip
        tokenizer = load_tokenizer(meta.path)
        previous = check_warm_start(spec, settings.volume_dir, meta, warnings)
    reporter.stage("preprocessing")
    with watch("tokenize"):
        data = prepare_dataset(
            loaded, tokenizer, max_seq_length=hp.max_seq_length, eval_fraction=ev.eval_fraction,
            max_eval=ev.max_eval_conversations, seed=hp.seed, tokenizer_name=spec.base_model,
            should_stop=stop, on_progress=counting(reporter, "tokenizing conversations"),
        )  # fmt: skip
    judge = JudgeSettings(settings.judge_base_url, settings.judge_api_key, settings.judge_model)
    cfg = train_config(spec, paths.checkpoints, paths.tensorboard, report_to(settings, warnings))
    plan = plan_job(
        data,
        meta,
        spec,
        cfg,
        device,
        settings,
        scenarios=scenarios,
        judge_settings=judge,
        processes=processes,
    )
    lineage = build_lineage(spec, dataset, data.summary, meta, previous)
    warnings += [*data.summary.warnings, *plan.warnings, *resume.warnings]
    reporter.stage(
        "preprocessing", total_steps=plan.total_steps, dataset=data.summary.as_dict(),
        plan=plan.model_dump(), warnings=warnings or None,
    )  # fmt: skip
    return Prepared(dataset, resume, data, tokenizer, meta, scenarios, judge, cfg, plan, lineage)


def keeps_checkpoints(spec: JobSpec, settings: Settings) -> bool:
    """After a completed job, optimizer checkpoints stay only when the job or the worker asks."""
    return (
        spec.output.keep_checkpoints
        if spec.output.keep_checkpoints is not None
        else settings.keep_checkpoints
    )


def held_out_measure(data: PreparedData, spec: JobSpec, pad_id: int) -> Callable[[Any], HeldOutLoss | None]:
    """The one way held-out loss is measured: before, during and after training."""
    budget, rows = eval_token_budget(spec), spec.hyperparameters.batch_size
    return lambda model: held_out_loss(model, data.eval, pad_id, token_budget=budget, max_rows=rows)


def baseline(
    reporter: Reporter, device: Device, watch: Stopwatch, measure, group: Group | None = None
) -> Callable[[LoadedModel], HeldOutLoss | None]:
    """The base model's held-out loss, measured once the model is loaded: a fresh adapter is the
    identity; a warm start's adapter is disabled, so "before" is always the base itself. Sharded,
    every forward of the model from here on is announced to the other ranks (parallel/relay.py)."""

    def first_eval(loaded: LoadedModel) -> HeldOutLoss | None:
        if group is not None:
            group.announce_forwards(loaded.model)
        reporter.stage("model_loaded", model=loaded.info(device.name))
        reporter.stage("baseline_eval")
        with watch("eval_before"), loaded.model.disable_adapter():
            return measure(loaded.model)

    return first_eval


def mean_of(loss: HeldOutLoss | None) -> float | None:
    return loss.mean if loss else None


def ev_steps(spec: JobSpec, plan) -> int:
    """Held-out loss during training every this many steps: the job's choice, else once per epoch."""
    return spec.training.eval_steps or max(1, plan.steps_per_epoch)


def open_reporter(
    spec: JobSpec,
    settings: Settings,
    attempt: AttemptLog,
    runpod_job: dict | None,
    channels: tuple,
    runpod_send: Callable | None,
) -> Reporter:
    """The job's events: RunPod /status, signed webhooks, the attempt log, and any extra channels."""
    out: list = [*channels, attempt]
    if runpod_job is not None:
        out.append(RunPodChannel(runpod_job, send=runpod_send))
    if spec.webhook_url:
        out.append(WebhookSender(spec.webhook_url, settings.webhook_secret or ""))
    meter = CostMeter(attempt.hourly, already_s=attempt.total_seconds() - attempt.seconds())
    return Reporter(
        spec.job_id,
        meter=meter,
        channels=out,
        min_interval_s=settings.progress_interval_s,
        first_sequence=attempt.next_sequence(),
    )


def counting(reporter: Reporter, what: str) -> Callable[[int, int], None]:
    """A progress callback for long dataset loops: `what: done/total`, rate-limited by the reporter."""
    return lambda done, total: reporter.progress(message=f"{what}: {done:,}/{total:,}")


def report_to(settings: Settings, warnings: list[str]) -> tuple[str, ...]:
    """TensorBoard always; Weights & Biases too when WANDB_API_KEY is set and wandb is installed."""
    if not settings.wandb_api_key:
        return ("tensorboard",)
    if importlib.util.find_spec("wandb") is None:
        warnings.append(
            "WANDB_API_KEY is set but the optional wandb package is not installed "
            "(pip install 'lora-worker[wandb]'); logged to TensorBoard only"
        )
        return ("tensorboard",)
    return ("tensorboard", "wandb")
