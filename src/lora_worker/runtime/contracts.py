"""What a job hands back: the result (RunPod's output and `result.json`) and the report, as typed models.

The dashboard, the terminal client and `list` read these; their JSON Schemas are published in
`docs/schemas/` (written by `python -m lora_worker schemas`, checked current by a test). Every
failure has the same shape as every success: `status`, `stage` and, when failed, `error`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.evaluation.evidence import Evidence

Status = Literal["completed", "failed", "cancelled"]
Verdict = Literal["improved", "unchanged", "worse", "not_measured"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterFiles(_Model):
    path: str = Field(description="The adapter folder on the volume (PEFT format, with the tokenizer).")
    archive: str = Field(description="tar.gz of the adapter and the report.")
    sha256: str = Field(description="SHA-256 of the archive.")
    size_bytes: int


class ReportFiles(_Model):
    json_path: str = Field(alias="json", description="report.json")
    markdown: str = Field(description="report.md")
    plot: str = Field(description="loss_curve.png")
    html: str | None = Field(None, description="report.html: the self-contained client report")
    human_sheet_html: str | None = Field(None, description="Blinded A/B sheet for the studio's staff.")
    human_sheet_csv: str | None = Field(None, description="The same sheet as CSV, to fill in.")
    human_key: str | None = Field(None, description="Which reply is which (kept out of the archive).")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)


class Metrics(_Model):
    train_loss: float | None = Field(None, description="Last logged training loss (nats per trained token).")
    eval_loss_before: float | None = Field(None, description="Held-out loss of the base model.")
    eval_loss_after: float | None = Field(None, description="Held-out loss with the adapter.")
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    steps: int = Field(0, description="Optimizer steps trained, in all attempts.")
    total_steps: int = 0
    epochs: float = 0.0
    tokens_trained: int = Field(0, description="Tokens processed by training (all epochs, all attempts).")
    tokens_per_second: float | None = Field(None, description="Training throughput of the last attempt.")
    peak_gpu_memory_gib: float | None = None
    padding_fraction: float | None = Field(None, description="Share of trained positions that are padding.")
    eval_loss_previous: float | None = Field(
        None, description="Held-out loss with the adapter a warm-started job began from (init_adapter)."
    )


class Outcome(_Model):
    """Did the adapter help on held-out data? Decided from the numbers only."""

    verdict: Verdict
    reason: str = Field(description="One sentence: the numbers behind the verdict.")
    delta: float | None = Field(None, description="eval_loss_after - eval_loss_before (nats per token).")
    relative_delta: float | None = Field(None, description="delta / eval_loss_before.")
    interval_95: tuple[float, float] | None = Field(
        None, description="Bootstrap 95 % interval of the mean per-conversation delta."
    )
    threshold: float = Field(description="|relative_delta| below this counts as unchanged (noise).")
    conversations: int = Field(0, description="Held-out conversations measured.")


class Attempt(_Model):
    """One run of the job on a worker; a resubmitted or redelivered job adds one."""

    started_at: str
    seconds: float = Field(description="Wall-clock seconds the attempt held the GPU.")
    cost_usd: float
    status: str = Field(description="completed / failed / cancelled, or running while under way.")
    resumed_from_step: int | None = None
    gpu: str = "cpu"
    last_sequence: int = Field(0, description="The last event sequence number this attempt sent.")


class JobResult(_Model):
    """RunPod's output for a job (and `jobs/<job_id>/result.json`)."""

    job_id: str | None
    task: Literal["train", "generate", "list"] = "train"
    status: Status
    stage: str = Field(description="The stage the job ended in (where it failed or was cancelled).")
    error: str | None = Field(None, description="Why it failed; RunPod marks a job FAILED when present.")
    error_message: str | None = Field(None, description="Same as error (the dashboard's column name).")
    message: str | None = Field(None, description="For a cancelled or replayed job: where it stopped.")
    verdict: Verdict | None = None
    outcome: Outcome | None = None
    dry_run: bool = False
    replayed: bool = Field(False, description="True when a completed job's stored result was returned again.")
    lora_artifact_path: str | None = None
    adapter: AdapterFiles | None = None
    report: ReportFiles | None = None
    metrics: Metrics | None = None
    dataset: dict[str, Any] | None = Field(None, description="The dataset summary (see the report schema).")
    plan: dict[str, Any] | None = Field(None, description="Steps, tokens, estimated time and cost.")
    lineage: dict[str, Any] | None = None
    versus_previous: Outcome | None = Field(
        None, description="The new adapter against the one it started from (warm start), same held-out set."
    )
    evidence: dict[str, Any] | None = Field(
        None,
        description="The evidence's figures (judge win rates, forgetting, end of turn); texts in the report.",
    )
    timings_s: dict[str, float] = Field(default_factory=dict)
    gpu: str = "cpu"
    gpu_seconds: float = Field(0.0, description="Seconds of all attempts together.")
    cost_usd: float = Field(0.0, description="Cost of all attempts together.")
    attempts: list[Attempt] = Field(default_factory=list)
    resumed_from_step: int | None = None
    recoveries: list[dict[str, Any]] = Field(default_factory=list)
    uploads: dict[str, Any] = Field(default_factory=dict)
    merged: dict[str, Any] | None = None
    warnings: list[str] = Field(default_factory=list)

    def to_output(self) -> dict[str, Any]:
        """Plain JSON for RunPod and result.json; `error` only when there is one (RunPod reads its presence)."""
        out = self.model_dump(mode="json")
        if out.get("error") is None:
            out.pop("error", None)
        return out


class Report(_Model):
    """`report.json`: everything `report.md` and `report.html` show, as data."""

    job_id: str
    status: Status
    verdict: Verdict
    headline: str
    outcome: Outcome
    base_model: str
    created_at: str
    resumed: bool = False
    attempts: list[Attempt] = Field(default_factory=list)
    dataset: dict[str, Any] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    metrics: Metrics
    history: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    samples: list[dict[str, Any]] = Field(default_factory=list)
    lineage: dict[str, Any] | None = None
    versus_previous: Outcome | None = Field(
        None, description="The new adapter against the one it started from (warm start), same held-out set."
    )
    timings_s: dict[str, float] = Field(default_factory=dict)
    gpu: str = "cpu"
    gpu_seconds: float = 0.0
    cost_usd: float = 0.0
    eval_cost_usd: float = 0.0
    warnings: list[str] = Field(default_factory=list)
    adapter: AdapterFiles | None = None
    evidence: Evidence | None = Field(None, description="Slices, scenarios, judge, forgetting, end of turn.")


def json_schemas() -> dict[str, dict]:
    """The published schemas: file name -> JSON Schema."""
    return {
        "job-result.schema.json": JobResult.model_json_schema(mode="serialization"),
        "report.schema.json": Report.model_json_schema(mode="serialization"),
    }
