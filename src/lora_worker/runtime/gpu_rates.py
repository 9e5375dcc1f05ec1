"""QLoRA training speed of Llama 3 70B per GPU type: one table, each figure with its source.

Used for time and cost before a job has measured its own rate (the plan, `dry_run`, the
`max_cost_usd` pre-check) and by the bench's job projection. Every rate says whether it was
measured or estimated; nothing is marked measured unless BENCHMARKS.md holds the measurement.

Rates are tokens per second of the project's training path (NF4 base, LoRA r=16 on all seven
projections, no fp32 up-cast, non-reentrant checkpointing, Liger, paged 8-bit AdamW) at the job's
default micro-batch (4 rows x 2048 tokens), counted as tokens the GPU computes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# FLOPs per trained token of Llama 3 70B: 6 x 69.5e9 matmul parameters (forward, checkpoint
# recompute, activation gradients; the frozen base has no weight gradients). Other model sizes
# are scaled from the 70B rate by this figure (see `estimate`).
FLOPS_PER_TOKEN_70B = 417e9

# The one throughput figure everything below is scaled from: the project-style recipe at 4 x 2048
# on an H200 capped at 79 GiB, 70B shape, r=16, measured with shared/tools/seed_recipe_baseline.py
# before the bench existed and quoted in BENCHMARKS.md ("Reference figures"); the bench has not
# re-measured it, so it counts as an estimate here. Tokens per second.
REFERENCE_TOKENS_PER_S = 1193.0
REFERENCE_PEAK_TFLOPS = 989.0  # the H200's dense bf16 peak (NVIDIA H200 datasheet: 1,979 with sparsity)

Basis = Literal["measured", "estimated"]


@dataclass(frozen=True)
class GpuRate:
    """One GPU type: how to recognise it, its datasheet figures, and the 70B QLoRA rate."""

    label: str
    match: tuple[str, ...]  # every one of these, upper-case, appears in the device or RunPod type name
    peak_bf16_tflops: float  # dense bf16 tensor-core peak (the datasheet's sparsity figure / 2)
    memory_gb: float  # on-board memory, decimal GB as the datasheet gives it
    tokens_per_s: float  # 70B QLoRA at 4 x 2048, see the module docstring
    basis: Basis
    source: str

    @property
    def peak_bf16_flops(self) -> float:
        return self.peak_bf16_tflops * 1e12


def _scaled(peak_tflops: float) -> float:
    """The reference rate scaled by dense bf16 peak: QLoRA's step time is dominated by bf16 matmuls
    on dequantized NF4 weights. The H200's faster memory (4.8 vs 3.35 TB/s on the H100 SXM) may
    make a card with the same peak a little slower than this says."""
    return round(REFERENCE_TOKENS_PER_S * peak_tflops / REFERENCE_PEAK_TFLOPS, 0)


_SCALED = "estimated: the H200 reference rate (BENCHMARKS.md) x this card's dense bf16 peak / 989 TFLOP/s"

# Most specific first: the first entry whose `match` strings all appear in the name wins.
GPU_RATES: tuple[GpuRate, ...] = (
    GpuRate(
        "H100 PCIe",
        ("H100", "PCIE"),
        756.0,  # NVIDIA H100 datasheet, PCIe: 1,513 TFLOPS bf16 with sparsity
        80,
        _scaled(756.0),
        "estimated",
        _SCALED,
    ),
    GpuRate(
        "H100 NVL",
        ("H100", "NVL"),
        835.0,  # NVIDIA H100 datasheet, NVL: 1,671 TFLOPS bf16 with sparsity
        94,
        _scaled(835.0),
        "estimated",
        _SCALED,
    ),
    GpuRate(
        "GH200",
        ("GH200",),
        989.0,  # NVIDIA GH200 datasheet: same Hopper tensor cores as the H100 SXM
        96,
        _scaled(989.0),
        "estimated",
        _SCALED,
    ),
    GpuRate(
        "H200",
        ("H200",),
        989.0,  # NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with sparsity
        141,
        REFERENCE_TOKENS_PER_S,
        "estimated",
        "estimated: the reference figure in BENCHMARKS.md (H200 capped at 79 GiB, project-style 4 x 2048), "
        "not re-measured by the bench",
    ),
    GpuRate(
        "H100 SXM",
        ("H100",),  # "NVIDIA H100 80GB HBM3"
        989.0,  # NVIDIA H100 datasheet, SXM: 1,979 TFLOPS bf16 with sparsity
        80,
        _scaled(989.0),
        "estimated",
        _SCALED,
    ),
    GpuRate(
        "A100 40GB",
        ("A100", "40GB"),
        312.0,  # NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)
        40,
        _scaled(312.0),
        "estimated",
        _SCALED,
    ),
    GpuRate(
        "A100 80GB",
        ("A100",),
        312.0,  # NVIDIA A100 datasheet, SXM4 and PCIe 80GB alike
        80,
        _scaled(312.0),
        "estimated",
        _SCALED,
    ),
    GpuRate(
        "L40S",
        ("L40S",),
        362.0,  # NVIDIA L40S datasheet: 733 TFLOPS bf16 with sparsity
        48,
        _scaled(362.0),
        "estimated",
        _SCALED,
    ),
)


@dataclass(frozen=True)
class RateEstimate:
    """A rate for one job: the card's table entry scaled to the model's FLOPs per token."""

    gpu: GpuRate
    tokens_per_s: float
    basis: Basis
    source: str


def rate_for(name: str) -> GpuRate | None:
    """The table entry for a CUDA device name ("NVIDIA H100 80GB HBM3") or a RunPod GPU type id;
    None for the CPU or a card not in the table."""
    upper = name.upper()
    return next((g for g in GPU_RATES if all(m in upper for m in g.match)), None)


def peak_bf16_flops(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a card by its name, or None when unknown (or the CPU)."""
    gpu = rate_for(name)
    return gpu.peak_bf16_flops if gpu else None


def estimate(name: str, flops_per_token: float = FLOPS_PER_TOKEN_70B) -> RateEstimate | None:
    """Training tokens per second for a model of `flops_per_token` on the card `name`, or None when
    the card is not in the table. Scaling by FLOPs per token keeps the 70B rate's efficiency, which
    is optimistic for much smaller models (their steps are shorter and overheads weigh more)."""
    gpu = rate_for(name)
    if gpu is None or flops_per_token <= 0:
        return None
    scale = FLOPS_PER_TOKEN_70B / flops_per_token
    source = (
        gpu.source if scale == 1 else f"{gpu.source}; scaled by FLOPs per token ({scale:.3g}x the 70B rate)"
    )
    basis: Basis = gpu.basis if scale == 1 else "estimated"
    return RateEstimate(gpu, round(gpu.tokens_per_s * scale, 1), basis, source)
