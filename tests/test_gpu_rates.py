"""The per-GPU rate table: names recognised as the driver and RunPod spell them, figures that follow
from their stated sources, and no figure claimed as measured without a measurement."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_worker.runtime.gpu_rates import (
    FLOPS_PER_TOKEN_70B,
    GPU_RATES,
    REFERENCE_PEAK_TFLOPS,
    REFERENCE_TOKENS_PER_S,
    estimate,
    peak_bf16_flops,
    rate_for,
)
from lora_worker.tools.deploy import DEFAULT_GPU_TYPE_IDS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),  # torch.cuda.get_device_name on an SXM card
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA L40S", "L40S"),
    ],
)
def test_device_names_find_their_entry(name: str, label: str) -> None:
    assert rate_for(name).label == label


def test_unknown_cards_and_the_cpu_have_no_rate() -> None:
    assert rate_for("cpu") is None and estimate("cpu") is None and peak_bf16_flops("cpu") is None
    assert rate_for("NVIDIA GeForce RTX 4090") is None


def test_every_gpu_the_endpoint_may_rent_has_a_rate_and_holds_the_70b_model() -> None:
    for gpu_type in DEFAULT_GPU_TYPE_IDS:
        gpu = rate_for(gpu_type)
        assert gpu is not None, gpu_type
        assert gpu.memory_gb >= 80, gpu_type


def test_estimated_rates_follow_the_reference_by_bf16_peak() -> None:
    for gpu in GPU_RATES:
        expected = REFERENCE_TOKENS_PER_S * gpu.peak_bf16_tflops / REFERENCE_PEAK_TFLOPS
        assert gpu.tokens_per_s == pytest.approx(expected, abs=0.5), gpu.label
    a100, h100 = rate_for("NVIDIA A100-SXM4-80GB"), rate_for("NVIDIA H100 80GB HBM3")
    assert h100.tokens_per_s / a100.tokens_per_s == pytest.approx(3.17, abs=0.01)  # "about 3x slower"


def test_nothing_is_claimed_as_measured_without_a_recorded_measurement() -> None:
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    for gpu in GPU_RATES:
        assert gpu.basis in ("measured", "estimated")
        if gpu.basis == "measured":
            assert "benchmarks/results/" in gpu.source, f"{gpu.label}: a measured rate names its results file"
            assert f"{gpu.tokens_per_s:,.0f}" in benchmarks, f"{gpu.label}: BENCHMARKS.md lacks the figure"


def test_estimate_scales_with_the_models_flops_per_token() -> None:
    full = estimate("NVIDIA H100 80GB HBM3")
    assert full.tokens_per_s == rate_for("NVIDIA H100 80GB HBM3").tokens_per_s and full.basis == "estimated"
    eight_b = estimate("NVIDIA H100 80GB HBM3", flops_per_token=FLOPS_PER_TOKEN_70B / 8.5)
    assert eight_b.tokens_per_s == pytest.approx(full.tokens_per_s * 8.5, rel=1e-3)
    assert "scaled by FLOPs per token" in eight_b.source
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
