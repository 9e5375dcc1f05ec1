"""The progress event: one typed model for everything the worker tells RunPod's `/status` and webhooks.

Built so the studio's dashboard stores it unchanged (docs/webhooks.md):

* `status` takes only the values of the dashboard's `training_jobs.status` CHECK list; the finer
  `stage` is a separate field, and `STAGE_STATUS` maps each stage to its status.
* `metrics` holds only columns of `training_metrics_history` (loss, learning_rate, grad_norm,
  epoch), and only on an event that reports a training log record of its own `step`; the dashboard
  inserts `{step, ...metrics}` as one history row. Held-out numbers are under `evaluation`.
* On the wire, unknown values are left out rather than sent as null: the dashboard copies
  `step`/`total_steps` into its row whenever the key is present, so a null would erase a value.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

Status = Literal["queued", "preprocessing", "model_loaded", "training", "completed", "failed", "cancelled"]
Stage = Literal[
    "queued",
    "fetching_dataset",
    "resolving_model",
    "preprocessing",
    "downloading_model",
    "model_loading",
    "model_loaded",
    "baseline_eval",
    "training",
    "evaluating",
    "saving",
    "merging",
    "reporting",
    "uploading",
    "completed",
    "failed",
    "cancelled",
]

STATUSES: tuple[str, ...] = get_args(Status)
STAGES: tuple[str, ...] = get_args(Stage)  # in the order a job passes through them
FINAL_STAGES = frozenset({"completed", "failed", "cancelled"})

# The one mapping from a stage to the dashboard's coarser status.
STAGE_STATUS: dict[str, str] = {
    "queued": "queued",
    "fetching_dataset": "preprocessing",
    "preprocessing": "preprocessing",
    "resolving_model": "preprocessing",
    "downloading_model": "preprocessing",
    "model_loading": "preprocessing",
    "model_loaded": "model_loaded",
    "baseline_eval": "model_loaded",
    "training": "training",
    "evaluating": "training",
    "saving": "training",
    "merging": "training",
    "reporting": "training",
    "uploading": "training",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}

# What each stage says in `message` when the caller gives no line of its own.
STAGE_MESSAGES: dict[str, str] = {
    "queued": "queued on the worker",
    "fetching_dataset": "reading and validating the dataset",
    "preprocessing": "validating and tokenizing the dataset",
    "resolving_model": "fetching the base model's config and tokenizer",
    "downloading_model": "fetching the base model's weights",
    "model_loading": "loading the base model in 4-bit",
    "model_loaded": "base model loaded",
    "baseline_eval": "measuring the base model's held-out loss",
    "training": "training",
    "evaluating": "evaluating the adapter on held-out data",
    "saving": "saving the adapter",
    "merging": "merging the adapter into the base weights",
    "reporting": "writing the report and the archive",
    "uploading": "uploading the adapter",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}

MAX_MESSAGE_CHARS = 500


def status_of(stage: str) -> str:
    """The dashboard status for `stage`; ValueError naming the known stages for anything else."""
    try:
        return STAGE_STATUS[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}; known stages: {', '.join(STAGES)}") from None


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite_or_none(value: Any) -> Any:
    # A diverged loss (NaN, inf) has no JSON form and no NUMERIC form; it is sent as unknown.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TrainingMetrics(_Frozen):
    """One training log record: exactly the columns of the dashboard's `training_metrics_history`.

    Non-finite values become None (left out on the wire), since neither JSON nor NUMERIC holds them.
    """

    loss: float | None = Field(None, description="Training loss of the logged step (nats per token).")
    learning_rate: float | None = Field(None, description="Learning rate the step was taken with.")
    grad_norm: float | None = Field(None, description="Gradient norm before clipping.")
    epoch: float | None = Field(None, ge=0, description="Epochs completed at the step, fractional.")

    @field_validator("loss", "learning_rate", "grad_norm", "epoch", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return _finite_or_none(value)

    def is_empty(self) -> bool:
        return all(v is None for v in (self.loss, self.learning_rate, self.grad_norm, self.epoch))


class Evaluation(_Frozen):
    """Held-out loss: of the base model (before) and at the latest evaluation during training."""

    step: int | None = Field(None, ge=0, description="Optimizer step at which `eval_loss` was measured.")
    eval_loss: float | None = Field(None, description="Held-out loss at `step` (nats per token).")
    eval_loss_before: float | None = Field(None, description="Held-out loss of the base model.")

    @field_validator("eval_loss", "eval_loss_before", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        return _finite_or_none(value)


class ProgressEvent(_Frozen):
    """One event of a job, as sent to RunPod's `/status` and to the dashboard's webhook."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    job_id: str = Field(min_length=1, description="The job (the dashboard's training_jobs.id).")
    status: Status = Field(description="The dashboard's coarse status (its CHECK list); see `stage`.")
    stage: Stage = Field(description="The finer stage; `status` is derived from it.")
    sequence: int = Field(ge=1, description="Increases by one with every event of the job.")
    timestamp: AwareDatetime = Field(description="When the event was made: ISO 8601 UTC, milliseconds.")
    message: str | None = Field(None, max_length=MAX_MESSAGE_CHARS, description="One line for a human.")
    step: int = Field(0, ge=0, description="Optimizer steps completed.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps planned (once known).")
    percent: float = Field(0.0, ge=0, le=100, description="Training progress, 0-100.")
    eta_seconds: float | None = Field(None, ge=0, description="Estimated seconds until training ends.")
    tokens_seen: int | None = Field(None, ge=0, description="Training tokens processed so far.")
    gpu_seconds: float = Field(0.0, ge=0, description="GPU time of the job so far (all attempts).")
    cost_usd: float = Field(0.0, ge=0, description="GPU cost so far, US dollars.")
    metrics: TrainingMetrics | None = Field(
        None, description="The training log record of `step`; only on events that report one."
    )
    evaluation: Evaluation | None = Field(None, description="Held-out loss before training and latest.")
    resumed_from_step: int | None = Field(None, ge=0, description="Checkpoint step this attempt resumed.")
    dataset: dict[str, Any] | None = Field(None, description="The dataset summary (preprocessing).")
    plan: dict[str, Any] | None = Field(None, description="Steps, tokens, estimated time and cost.")
    model: dict[str, Any] | None = Field(None, description="The loaded model: parameters, device.")
    download: dict[str, Any] | None = Field(None, description="Base model download progress.")
    warnings: list[str] | None = Field(None, description="Things the sender should know.")
    verdict: dict[str, Any] | None = Field(None, description="Did the adapter help (final event).")
    lora_artifact_path: str | None = Field(None, description="Where the adapter is (completed).")
    error_message: str | None = Field(None, description="Why the job failed or was cancelled.")
    output: dict[str, Any] | None = Field(None, description="The job's result (final event).")

    @field_validator("message")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and ("\n" in value or "\r" in value):
            raise ValueError("message must be one line")
        return value

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @field_serializer("timestamp")
    def _iso_z(self, value: datetime) -> str:
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    @model_validator(mode="after")
    def _status_matches_stage(self) -> ProgressEvent:
        if STAGE_STATUS[self.stage] != self.status:
            raise ValueError(
                f"status {self.status!r} does not match stage {self.stage!r} "
                f"(expected {STAGE_STATUS[self.stage]!r})"
            )
        return self

    def to_wire(self) -> dict[str, Any]:
        """The JSON object sent: plain JSON values, unknown (None) fields left out."""
        return self.model_dump(mode="json", exclude_none=True)


def event_json_schema() -> dict[str, Any]:
    """The JSON Schema of `ProgressEvent` (for docs/schemas/)."""
    return ProgressEvent.model_json_schema()
