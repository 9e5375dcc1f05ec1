"""The training stage of a job: the stock Trainer with the job's callbacks (progress, held-out
evaluation, cancel and limits) wired to the job's reporter and cancel flag."""

from __future__ import annotations

import threading
from collections.abc import Callable

from lora_worker.runtime.data import PreparedData
from lora_worker.runtime.spec import JobSpec
from lora_worker.runtime.training.callbacks import EvalCallback, ProgressCallback, StopCallback
from lora_worker.runtime.training.checkpoints import ResumePoint
from lora_worker.runtime.training.oom import Recovery
from lora_worker.runtime.training.ranks import Ranks
from lora_worker.runtime.training.trainer import TrainConfig, TrainOutcome, train


def run_training(
    model,
    data: PreparedData,
    pad_id: int,
    cfg: TrainConfig,
    spec: JobSpec,
    *,
    reporter,
    cancel: threading.Event,
    resume: ResumePoint,
    evaluate: Callable[[], float | None],
    eval_every_steps: int,
    elapsed: Callable[[], float],
    hourly_usd: float,
    prior_cost_usd: float,
    ranks: Ranks | None = None,
    recoveries: tuple[Recovery, ...] = (),
) -> TrainOutcome:
    """Train to the end, a stop (cancel, time or cost limit, non-finite loss, full disk) or a failure.

    In a process group this is rank 0's side (`ranks`): its callbacks decide for every rank."""
    progress = ProgressCallback(
        reporter, tokens_per_epoch=data.summary.tokens_total, num_epochs=spec.hyperparameters.num_epochs
    )
    stop = StopCallback(
        cancel,
        max_seconds=spec.max_duration_hours * 3600,
        max_cost_usd=spec.max_cost_usd,
        hourly_usd=hourly_usd,
        elapsed=elapsed,
        prior_cost_usd=prior_cost_usd,
    )
    callbacks = [progress, stop]
    if data.eval:
        callbacks.append(EvalCallback(evaluate, eval_every_steps, progress.record_eval))
    return train(model, data.train, pad_id, cfg, callbacks, resume=resume, ranks=ranks, recoveries=recoveries)
