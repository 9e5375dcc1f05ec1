"""The plan: steps, time, cost and memory, from the tokenized dataset and the model's config alone.

Decided before any weight file is touched, so a `dry_run` costs seconds, and a job that cannot
work (data lost to the length limit, a GPU too small) is refused before a 141 GB download. Every
time figure is an estimate and says what it assumes; nothing here was measured on a GPU.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.data import PreparedData, check_data_loss
from lora_worker.runtime.device import Device
from lora_worker.runtime.evaluation.evidence import JudgeSettings, estimate_judge
from lora_worker.runtime.evaluation.scenarios import Scenario
from lora_worker.runtime.gpu_rates import estimate as rate_estimate
from lora_worker.runtime.model.memory import (
    GpuMemoryError,
    MemoryEstimate,
    check_fits,
    estimate_memory,
    sharded_memory,
)
from lora_worker.runtime.model.resolve import ModelMeta
from lora_worker.runtime.settings import Settings
from lora_worker.runtime.spec import JobInputError, JobSpec
from lora_worker.runtime.training.oom import largest_micro_batch
from lora_worker.runtime.training.ranks import padding_per_step, per_rank_accumulation
from lora_worker.runtime.training.schedule import few_steps_warning, steps_per_epoch, warmup_steps_for
from lora_worker.runtime.training.trainer import TrainConfig, plan_batches

# Assumptions behind the time estimates (all stated in the plan, none measured here):
DOWNLOAD_BYTES_PER_S = 100e6  # Hub to a RunPod network volume; 100 MB/s
VOLUME_READ_BYTES_PER_S = 1e9  # reading safetensors off the network volume at load; 1 GB/s
COLD_START_S = 60.0  # image pull with FlashBoot off, CUDA init, imports
EVAL_SPEEDUP = 3.0  # a forward-only held-out pass vs a training step (forward + recompute + backward)
# The GPU types an endpoint may run on, for the table a dry run shows on any machine.
PLANNED_GPUS = ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA H200")
MEMORY_MARGIN_GIB = 2.0  # kept free below the card's free memory: CUDA context, fragmentation
# Held-out evaluation runs without Liger's fused loss, so its full logits (tokens x 128,256 vocab)
# exist in memory: its micro-batches are capped at this many tokens (about 6 GiB of logits).
EVAL_MAX_TOKENS = 8192


class TimeEstimate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: str
    gpus: int = Field(1, description="GPUs the job holds (data parallel); time and cost count all of them.")
    tokens_per_s: float = Field(description="Training throughput assumed for this card (70B-scaled).")
    basis: str = Field(description="measured or estimated, with its source.")
    seconds: dict[str, float] = Field(description="cold_start, download, load, train, eval, samples, total.")
    cost_usd: float | None = None


class Plan(BaseModel):
    """What the job will do, decided from the data and the model's config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    processes: int = Field(1, description="Processes (one per GPU) training the job.")
    parallel_mode: Literal["single", "data_parallel", "fsdp"] = Field(
        "single",
        description="`single` (one process), `data_parallel` (each GPU holds the whole model) or `fsdp` "
        "(FSDP-QLoRA: the model sharded across the GPUs); `memory` is per GPU in that mode.",
    )
    per_process_accumulation: int = Field(
        1,
        description="Micro-batches each process trains per optimizer step (the step's micro-batches split "
        "across processes, padded with empty ones to a multiple of them).",
    )
    tokens_to_train: int = Field(description="Tokens of all epochs (folded, padding excluded).")
    micro_batch_tokens: int = Field(description="Token budget of one micro-batch.")
    largest_micro_batch_tokens: int = Field(
        description="Rows x padded length of the largest planned micro-batch."
    )
    memory: dict[str, Any] | None = Field(None, description="Estimated peak GPU memory in GiB, by part.")
    estimate: TimeEstimate | None = Field(None, description="For this worker's GPU.")
    estimates: list[TimeEstimate] = Field(default_factory=list, description="Per GPU type.")
    evidence: dict[str, Any] | None = Field(None, description="Scenarios and judge calls, and their time.")
    assumptions: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


def train_config(
    spec: JobSpec, checkpoints: Path, logging_dir: Path, report_to: tuple[str, ...]
) -> TrainConfig:
    """The trainer's plain values from the spec: one place, for the plan and the run."""
    hp, tr = spec.hyperparameters, spec.training
    return TrainConfig(
        output_dir=checkpoints,
        logging_dir=logging_dir,
        num_epochs=hp.num_epochs,
        learning_rate=hp.learning_rate,
        warmup_ratio=hp.warmup_ratio,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        micro_batch_tokens=spec.micro_batch_tokens,
        max_rows=hp.batch_size,
        seed=hp.seed,
        optimizer=tr.optimizer,
        checkpoint_steps=tr.checkpoint_steps,
        checkpoint_minutes=tr.checkpoint_minutes,
        logging_steps=tr.logging_steps,
        gradient_checkpointing=tr.gradient_checkpointing,
        activation_offload=tr.activation_offload,
        packing=tr.packing,
        report_to=report_to,
    )


def eval_token_budget(spec: JobSpec) -> int:
    return min(spec.micro_batch_tokens, EVAL_MAX_TOKENS)


def liger_will_run(spec: JobSpec, device: Device) -> bool:
    choice = spec.training.liger_kernels
    installed = importlib.util.find_spec("liger_kernel") is not None
    return choice == "on" or (choice == "auto" and device.is_cuda and installed)


def plan_job(
    data: PreparedData,
    meta: ModelMeta,
    spec: JobSpec,
    cfg: TrainConfig,
    device: Device,
    settings: Settings,
    *,
    scenarios: Sequence[Scenario] | None = None,
    judge_settings: JudgeSettings | None = None,
    processes: int = 1,
) -> Plan:
    """Steps and estimates; raises DatasetError (lossy data), GpuMemoryError (does not fit) or
    JobInputError (a judge that cannot run).

    With `processes` > 1 (data parallel, one GPU each) every GPU holds the whole model and trains
    micro-batches of the same size, so the memory pre-flight is the one-GPU one; time and cost count
    all of them."""
    hp = spec.hyperparameters
    check_data_loss(data.summary, spec.data.max_dropped_target_share, option="data.max_dropped_target_share")
    batches = plan_batches(data.train, cfg)
    per_epoch = steps_per_epoch(len(batches), hp.gradient_accumulation_steps)
    # one schedule holds every epoch: a step may straddle two epochs, so ceil over the whole
    total = steps_per_epoch(len(batches) * hp.num_epochs, hp.gradient_accumulation_steps)

    def estimate(auto_optimizer: str) -> MemoryEstimate:
        return estimate_memory(
            meta.config,
            lora_r=hp.lora_r,
            micro_batch_tokens=largest_micro_batch(data.train, batches, cfg.packing == "packed")[0],
            eval_tokens=eval_token_budget(spec),
            upcast_fp32=spec.training.upcast_fp32,
            liger=liger_will_run(spec, device),
            optimizer=auto_optimizer if spec.training.optimizer == "auto" else spec.training.optimizer,
            gradient_checkpointing=spec.training.gradient_checkpointing,
            activation_offload=spec.training.activation_offload,
        )

    whole = estimate("paged_adamw_8bit")
    # sharded LoRA weights are stepped by plain AdamW (trainer.resolve_optimizer)
    sharded = sharded_memory(estimate("adamw_torch"), processes, int(meta.config["num_hidden_layers"]))
    mode = parallel_mode(spec, whole, device, processes)
    memory = sharded if mode == "fsdp" else whole
    if device.is_cuda:
        check_fits_each(memory, device, processes, mode, sharded)
    tokens = data.summary.tokens_total * hp.num_epochs
    # the evidence stage as it would run on a GPU (scenarios, judge), for every card in the table
    judge = estimate_judge(
        spec, Device("cuda", "planned"), judge_settings or JudgeSettings(), scenarios=scenarios,
        eval_conversations=data.eval_conversations,
    )  # fmt: skip
    evidence_s = (judge.generation_seconds or 0.0) + (judge.judge_seconds or 0.0)
    estimates = [
        _time(gpu, tokens, data, meta, spec, settings, evidence_s, processes) for gpu in PLANNED_GPUS
    ]
    here = (
        _time(device.name, tokens, data, meta, spec, settings, evidence_s, processes)
        if device.is_cuda
        else None
    )
    warnings = [
        w
        for w in (
            few_steps_warning(
                total,
                micro_batches_per_epoch=len(batches),
                gradient_accumulation_steps=hp.gradient_accumulation_steps,
                num_epochs=hp.num_epochs,
            ),
        )
        if w
    ]
    warnings += _limit_warnings(here, spec) + padding_warnings(hp.gradient_accumulation_steps, processes)
    warnings += judge.warnings
    return Plan(
        micro_batches_per_epoch=len(batches),
        steps_per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=warmup_steps_for(total, hp.warmup_ratio),
        processes=processes,
        parallel_mode=mode,
        per_process_accumulation=per_rank_accumulation(hp.gradient_accumulation_steps, processes),
        tokens_to_train=tokens,
        micro_batch_tokens=spec.micro_batch_tokens,
        largest_micro_batch_tokens=memory.micro_batch_tokens,
        memory=memory.as_dict(),
        estimate=here,
        estimates=[e for e in estimates if e is not None],
        evidence=judge.model_dump(),
        assumptions=ASSUMPTIONS + PARALLEL_ASSUMPTIONS.get(mode, []),
        warnings=warnings,
    )


def parallel_mode(spec: JobSpec, whole: MemoryEstimate, device: Device, processes: int) -> str:
    """`single`, `data_parallel` or `fsdp`: the job's `distributed.mode`, or for `auto` data parallel
    when the whole model and a micro-batch fit one GPU (always on the CPU), else FSDP."""
    asked = spec.distributed.mode
    if processes == 1:
        if asked == "fsdp":
            raise JobInputError(
                ["distributed.mode: 'fsdp' shards the model across processes and needs at least 2 "
                 "(distributed.num_processes, or a worker with more than one GPU)"]
            )  # fmt: skip
        return "single"
    if asked != "auto":
        return asked
    if not device.is_cuda:
        return "data_parallel"
    try:
        check_fits(whole, free_bytes=device.free_bytes, margin_gib=MEMORY_MARGIN_GIB)
    except GpuMemoryError:
        return "fsdp"
    return "data_parallel"


def check_fits_each(
    memory: MemoryEstimate, device: Device, processes: int, mode: str, sharded: MemoryEstimate
) -> None:
    """The per-GPU pre-flight of the chosen mode (`memory`: its estimate); when data parallel does not
    fit, the error says whether sharding would."""
    try:
        check_fits(memory, free_bytes=device.free_bytes, margin_gib=MEMORY_MARGIN_GIB)
    except GpuMemoryError as err:
        if mode != "data_parallel":
            raise
        raise GpuMemoryError(
            f"{err} With {processes} processes data parallel, each GPU holds the whole model; "
            f"distributed.mode 'fsdp' (or 'auto') shards it: about {sharded.peak_gib:.1f} GiB per GPU."
        ) from None


ASSUMPTIONS = [
    f"download from the Hub at {DOWNLOAD_BYTES_PER_S / 1e6:.0f} MB/s, volume reads at "
    f"{VOLUME_READ_BYTES_PER_S / 1e9:.0f} GB/s, {COLD_START_S:.0f} s cold start",
    "training rates per GPU type from runtime/gpu_rates.py (estimated unless marked measured)",
    f"held-out evaluation {EVAL_SPEEDUP:.0f}x faster per token than training; scenario replies and the "
    "judge as estimated in runtime/evaluation/evidence.py",
]
PARALLEL_ASSUMPTIONS = {
    "data_parallel": [
        "data parallel: training runs at the one-GPU rate times the processes that have micro-batches in each "
        "optimizer step (LoRA gradients all-reduced once per step; not measured); held-out evaluation, samples "
        "and the judge run on one GPU while the others wait; cost counts every GPU for the whole job",
    ],
    "fsdp": [
        "fsdp: training time as data parallel, without the all-gathers of every layer's NF4 weights in each "
        "forward and backward (not measured: a lower bound); held-out evaluation, samples and the judge run "
        "at the sharded model's speed, every GPU taking part; cost counts every GPU for the whole job",
    ],
}


def _flops_per_token(config: dict) -> float:
    """6 x the decoder's matmul parameters (forward, recompute, activation gradients)."""
    h, inter, layers = (
        int(config["hidden_size"]),
        int(config["intermediate_size"]),
        int(config["num_hidden_layers"]),
    )
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter
    return 6.0 * (layers * per_layer + h * int(config["vocab_size"]))


def _time(
    gpu: str,
    tokens: int,
    data: PreparedData,
    meta: ModelMeta,
    spec: JobSpec,
    settings: Settings,
    evidence_s: float,
    processes: int = 1,
) -> TimeEstimate | None:
    rate = rate_estimate(gpu, _flops_per_token(meta.config))
    if rate is None:
        return None
    hp = spec.hyperparameters
    ga = hp.gradient_accumulation_steps
    speedup = ga / per_rank_accumulation(ga, processes)  # micro-batches trained side by side per step
    weights_bytes = _weights_bytes(meta.config)
    evals_during = max(0, math.ceil(hp.num_epochs) - 1) if spec.training.eval_steps is None else 0
    eval_tokens = data.summary.eval_tokens * (2 + evals_during)
    seconds = {
        "cold_start": COLD_START_S,
        "download": (meta.download_bytes or 0) / DOWNLOAD_BYTES_PER_S,
        "load": weights_bytes / VOLUME_READ_BYTES_PER_S,
        "train": tokens / (rate.tokens_per_s * speedup),
        "eval": eval_tokens / (rate.tokens_per_s * EVAL_SPEEDUP),
        "evidence": evidence_s,
    }
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    seconds["total"] = round(sum(seconds.values()), 1)
    hourly = settings.hourly_rate(gpu)
    return TimeEstimate(
        gpu=rate.gpu.label,
        gpus=processes,
        tokens_per_s=rate.tokens_per_s,
        basis=f"{rate.basis}: {rate.source}",
        seconds=seconds,
        cost_usd=round(seconds["total"] / 3600 * hourly * processes, 2),
    )


def _weights_bytes(config: dict) -> float:
    """bf16 bytes of the checkpoint: what a first load reads (the NF4 copy later reads about 0.28x)."""
    return _flops_per_token(config) / 6.0 * 2


def padding_warnings(accumulation: int, processes: int) -> list[str]:
    """Processes left without a micro-batch in each optimizer step wait for the others."""
    pad = padding_per_step(accumulation, processes)
    if pad == 0:
        return []
    busy = accumulation / (accumulation + pad)
    return [
        f"hyperparameters.gradient_accumulation_steps {accumulation} is not a multiple of the {processes} "
        f"processes: each optimizer step gets {pad} empty micro-batch{'es' * (pad != 1)}, so the GPUs are busy "
        f"{busy:.0%} of a step; {per_rank_accumulation(accumulation, processes) * processes} would keep every one busy"
    ]


def _limit_warnings(here: TimeEstimate | None, spec: JobSpec) -> list[str]:
    if here is None:
        return []
    out = []
    total = here.seconds["total"]
    if total > spec.max_duration_hours * 3600:
        out.append(
            f"estimated {total / 3600:.1f} h on {here.gpu} exceeds max_duration_hours={spec.max_duration_hours:g}: "
            "the job will stop with a checkpoint before the end (resubmit to resume)"
        )
    if spec.max_cost_usd is not None and here.cost_usd is not None and here.cost_usd > spec.max_cost_usd:
        out.append(
            f"estimated cost ${here.cost_usd:.2f} on {here.gpu} exceeds max_cost_usd={spec.max_cost_usd:g}: "
            "the job will stop with a checkpoint before the limit"
        )
    return out
