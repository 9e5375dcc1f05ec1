"""The job input, parsed once into one typed, immutable spec before any heavy work.

Field docs live here, on the fields; the README's input table is generated from them
(`input_table_markdown()`) and a test checks that the README carries the current table.
Every problem in an input is collected and reported at once, each naming its field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lora_worker.runtime.net import UrlNotAllowed, check_url

DEFAULT_BASE_MODEL = "meta-llama/Meta-Llama-3-70B-Instruct"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JobInputError(ValueError):
    """A job input with one or more problems; `problems` lists each as 'field: what is wrong'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid job input:\n" + "\n".join(f"  - {p}" for p in problems))


class _Strict(BaseModel):
    # strict: "3" is not an int and 1 is not a bool; forbid: a misspelled key is an error, not a default.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Hyperparameters(_Strict):
    """Training hyperparameters; names follow the studio's RunPod API."""

    # At most 99: the dashboard's epoch columns are NUMERIC(4,2), which cannot hold 100.00.
    num_epochs: int = Field(3, ge=1, le=99, description="Passes over the training conversations.")
    batch_size: int = Field(
        4,
        ge=1,
        le=256,
        description="Most sequences in one micro-batch (rows, each right-padded to the longest).",
    )
    gradient_accumulation_steps: int = Field(
        4, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    learning_rate: float = Field(
        2e-4, gt=0, le=1.0, description="Peak learning rate (cosine schedule after warmup)."
    )
    # At most 512: the largest --max-lora-rank vLLM serves (docs/serving.md).
    lora_r: int = Field(16, ge=1, le=512, description="LoRA rank (vLLM serves ranks up to 512).")
    lora_alpha: int = Field(32, ge=1, le=4096, description="LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path, in [0, 1).")
    warmup_ratio: float = Field(
        0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up the LR."
    )
    max_seq_length: int = Field(
        2048,
        ge=64,
        le=131072,
        description="Longest example in tokens; longer ones are split at turn boundaries.",
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=64,
        le=1_048_576,
        description="Token budget of one micro-batch (rows x padded length); default batch_size x max_seq_length.",
    )
    seed: int = Field(
        42,
        ge=0,
        le=2**32 - 1,
        description="Seed for the data split, shuffling, LoRA init and dropout (0 to 2**32-1).",
    )


class TrainingOptions(_Strict):
    """How training runs; the defaults are the measured choices (see BENCHMARKS.md)."""

    fold_conversations: bool = Field(
        True, description="Train each consistent conversation once, with loss on every target turn."
    )
    packing: Literal["rows", "packed"] = Field(
        "rows",
        description="`rows`: one example per right-padded row, no mask (fastest measured); "
        "`packed`: examples back to back in one row with a block-diagonal mask.",
    )
    gradient_checkpointing: bool = Field(True, description="Non-reentrant activation checkpointing.")
    upcast_fp32: bool = Field(
        False, description="PEFT's `prepare_model_for_kbit_training` (fp32 embeddings and head; more memory)."
    )
    activation_offload: bool = Field(
        False,
        description="Keep checkpointed activations in CPU memory instead of on the GPU (longer contexts, slower).",
    )
    liger_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger fused kernels: `auto` uses them on CUDA when installed."
    )
    optimizer: Literal["auto", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch"] = Field(
        "auto", description="`auto`: paged 8-bit AdamW on CUDA, AdamW on the CPU."
    )
    checkpoint_steps: int = Field(
        50, ge=1, le=1_000_000, description="Save a resumable checkpoint every N optimizer steps."
    )
    checkpoint_minutes: float = Field(
        30.0, gt=0, le=1440, description="... and at least every this many minutes."
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Held-out loss every N steps during training (default: once per epoch).",
    )
    logging_steps: int = Field(1, ge=1, le=10_000, description="Log train loss every N optimizer steps.")


class DistributedOptions(_Strict):
    """How many processes (one per GPU) train the job, and how they share it. Not part of what the job
    trains: a checkpoint written by N processes, in either mode, resumes on any other number."""

    num_processes: int | None = Field(
        None,
        ge=1,
        le=8,  # the most GPUs of one type a RunPod host has (tools/deploy.py)
        description="Processes (one per GPU) that train the job; each trains its share of every optimizer "
        "step's micro-batches. Default: every visible GPU, 1 on the CPU.",
    )
    mode: Literal["auto", "data_parallel", "fsdp"] = Field(
        "auto",
        description="With more than one process: `data_parallel` (each GPU holds the whole NF4 model; fastest), "
        "`fsdp` (FSDP-QLoRA: the NF4 weights, LoRA weights and optimizer state sharded across the GPUs, "
        "each layer gathered for its forward and backward), or `auto`: data parallel when the memory "
        "estimate fits one GPU, else FSDP.",
    )


class DataOptions(_Strict):
    """What of the dataset is trained on."""

    max_dropped_target_share: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Refuse the job (before any weights load) when length limits would drop more than this "
        "share of the trainable target tokens.",
    )
    min_quality_score: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description="Train only target turns whose `training_metadata.quality_score` is at least this "
        "(lower ones stay as context); off by default.",
    )


class EvaluationOptions(_Strict):
    """Held-out evaluation and before/after samples."""

    eval_fraction: float = Field(0.1, ge=0.0, lt=0.9, description="Share of conversations held out.")
    max_eval_conversations: int = Field(
        24, ge=0, le=10_000, description="Cap on held-out conversations (bounds eval cost)."
    )
    num_samples: int = Field(
        10, ge=0, le=100, description="How many scenarios the report shows as before/after samples."
    )
    max_new_tokens: int = Field(
        256, ge=1, le=4096, description="Longest reply, in tokens, to a scenario (base and adapted)."
    )
    scenarios_path: str | None = Field(
        None,
        description="JSONL of scenarios (chat messages up to a user turn, optional tags and reference reply) "
        "on the volume; default: turns of the held-out conversations, stratified.",
    )
    scenarios_url: str | None = Field(None, description="HTTPS URL of the same JSONL.")
    num_scenarios: int = Field(
        20, ge=0, le=500, description="Scenarios answered by the base and the adapted model (0: none)."
    )
    judge: Literal["auto", "none", "self", "openai"] = Field(
        "auto",
        description="Who compares base and adapted replies: `self` (the base model, adapter disabled), `openai` "
        "(JUDGE_BASE_URL/JUDGE_API_KEY/JUDGE_MODEL on the worker), `none`; `auto`: self on a GPU, none on the CPU.",
    )
    max_judge_minutes: float = Field(
        30.0,
        gt=0,
        le=1440,
        description="Bound on the judge's estimated time; fewer scenarios are judged beyond it.",
    )
    forgetting_probe: bool = Field(
        True, description="Loss on a shipped general-ability set before and after (catastrophic forgetting)."
    )

    @field_validator("scenarios_url")
    @classmethod
    def _scenarios_https(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, allow_loopback_http=True)


class OutputOptions(_Strict):
    """Where the adapter goes besides the volume."""

    upload_url: str | None = Field(
        None,
        description="Presigned HTTP PUT URL (S3, R2, GCS, Supabase signed upload) for the `tar.gz` archive.",
    )
    hf_repo: str | None = Field(
        None, description="Private Hugging Face Hub repo to push the adapter to (needs HF_TOKEN)."
    )
    merge: bool = Field(
        False, description="Also write the adapter merged into the base in bf16, if memory/disk allow."
    )
    adapter_dtype: Literal["bf16", "fp32"] = Field(
        "bf16", description="dtype of the saved LoRA weights: bf16 (half the size, what vLLM serves) or fp32."
    )
    keep_checkpoints: bool | None = Field(
        None,
        description="Keep the optimizer checkpoints after the job completes (default: the worker's "
        "KEEP_CHECKPOINTS setting, else removed; adapter, report, result and archive are always kept).",
    )

    @field_validator("upload_url")
    @classmethod
    def _upload_https(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, allow_loopback_http=True)

    @field_validator("hf_repo")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", v):
            raise ValueError("must be a Hub repo id like 'org/name'")
        return v


class JobSpec(_Strict):
    """One training job. Exactly one of `dataset_url` and `dataset_path` is required."""

    task: Literal["train"] = Field("train", description="`train` (default), `generate` or `list`: see below.")
    job_id: str | None = Field(
        None,
        description="Names the job's folder `jobs/<job_id>/`; default: the RunPod job id. Resubmit to resume.",
    )
    dataset_url: str | None = Field(
        None, description="HTTPS URL of the dataset file (plain http only on loopback)."
    )
    dataset_path: str | None = Field(
        None, description="Path of the dataset file on the volume or local disk."
    )
    dataset_format: Literal["auto", "brightrun-lora-v4", "chat-jsonl"] = Field(
        "auto", description="Dataset layout; `auto` detects it."
    )
    base_model: str = Field(
        DEFAULT_BASE_MODEL, description="Hugging Face repo id or a local model directory."
    )
    base_model_revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of the base model."
    )
    init_adapter: str | None = Field(
        None,
        description="Start from a previous adapter (a job_id on this volume, or an adapter folder) instead of a "
        "fresh one; the report then compares with it as well as with the base.",
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="See below.")
    data: DataOptions = Field(default_factory=DataOptions, description="See below.")
    training: TrainingOptions = Field(default_factory=TrainingOptions, description="See below.")
    distributed: DistributedOptions = Field(default_factory=DistributedOptions, description="See below.")
    evaluation: EvaluationOptions = Field(default_factory=EvaluationOptions, description="See below.")
    output: OutputOptions = Field(default_factory=OutputOptions, description="See below.")
    webhook_url: str | None = Field(
        None, description="Signed progress webhooks go here (needs WEBHOOK_SECRET)."
    )
    max_duration_hours: float = Field(
        24.0, gt=0, le=168, description="Stop with a checkpoint after this long."
    )
    max_cost_usd: float | None = Field(
        None, gt=0, le=1_000_000, description="Stop with a checkpoint before the GPU cost passes this."
    )
    dry_run: bool = Field(
        False, description="Validate the input and dataset, report the plan, train nothing."
    )

    @field_validator("job_id")
    @classmethod
    def _safe_job_id(cls, v: str | None) -> str | None:
        if v is not None and (not _SAFE_NAME.fullmatch(v) or ".." in v):
            raise ValueError(
                "must be 1-128 characters of letters, digits, '.', '_' or '-', start with a letter or digit, "
                "and contain no '..' (it names a folder on the volume)"
            )
        return v

    @field_validator("dataset_url")
    @classmethod
    def _dataset_https(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, allow_loopback_http=True)

    @field_validator("webhook_url")
    @classmethod
    def _webhook_https(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, allow_loopback_http=True)

    @property
    def micro_batch_tokens(self) -> int:
        hp = self.hyperparameters
        return hp.micro_batch_tokens or hp.batch_size * hp.max_seq_length


def _check_url(v: str, *, allow_loopback_http: bool) -> str:
    try:
        return check_url(v, allow_loopback_http=allow_loopback_http)
    except UrlNotAllowed as err:
        raise ValueError(str(err)) from None


_SECRET_KEYS = {"webhook_secret", "hf_token", "wandb_api_key", "runpod_api_key"}


def validation_problems(err: ValidationError) -> list[str]:
    """Each pydantic error as 'field: what is wrong'."""
    out = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "input"
        if e["type"] == "extra_forbidden":
            out.append(f"{loc}: unknown field")
        elif e["type"] == "value_error":
            msg = str(e["msg"]).removeprefix("Value error, ")
            out.append(msg if not e["loc"] else f"{loc}: {msg}")
        else:
            out.append(f"{loc}: {e['msg']} (got {e['input']!r})"[:300])
    return out


def parse_input(
    model: type[BaseModel],
    raw: Any,
    *,
    runpod_job_id: str | None = None,
    extra_problems: Callable[[dict], list[str]] = lambda data: [],
) -> Any:
    """Parse a RunPod `input` into `model` (a strict spec with a `job_id` field); raises
    `JobInputError` listing every problem: secrets in the input, each field's error, and
    `extra_problems(data)` (checks across fields, which pydantic skips once a field has failed)."""
    if not isinstance(raw, dict):
        raise JobInputError([f"input: must be a JSON object, got {type(raw).__name__}"])
    problems = [
        f"{key}: secrets are not accepted in the job input; set {key.upper()} in the worker's environment "
        "(endpoint settings) instead"
        for key in raw
        if key.lower() in _SECRET_KEYS
    ]
    data = {k: v for k, v in raw.items() if k.lower() not in _SECRET_KEYS}
    problems += extra_problems(data)
    try:
        spec = model.model_validate(data)
    except ValidationError as err:
        raise JobInputError([*problems, *validation_problems(err)]) from None
    if problems:
        raise JobInputError(problems)
    if spec.job_id is None:
        if runpod_job_id is None:
            raise JobInputError(["job_id: required when the request does not come from RunPod's queue"])
        try:
            spec = spec.model_copy(update={"job_id": JobSpec._safe_job_id(runpod_job_id)})
        except ValueError as err:
            raise JobInputError([f"job_id: the RunPod job id {runpod_job_id!r} {err}"]) from None
    return spec


def _one_dataset(data: dict) -> list[str]:
    if (data.get("dataset_url") is None) == (data.get("dataset_path") is None):
        return ["dataset_url, dataset_path: give exactly one of them"]
    return []


def parse_job_input(raw: Any, *, runpod_job_id: str | None = None) -> JobSpec:
    """Parse and validate a training job's `input`; raises `JobInputError` listing every problem."""
    return parse_input(JobSpec, raw, runpod_job_id=runpod_job_id, extra_problems=_one_dataset)


def input_table_markdown() -> str:
    """The README's input reference, generated from the field docs above."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                continue
            default = "required" if f.is_required() else ("" if f.default_factory else repr(f.default))
            type_name = re.sub(r"typing\.|<class '([^']+)'>", r"\1", str(ann)).replace("|", "or")
            rows.append(f"| `{prefix}{name}` | {type_name} | `{default}` | {f.description or ''} |")
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(JobSpec, "")
    return "\n".join(rows)
