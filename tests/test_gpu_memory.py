"""GPU memory pre-flight with Llama 3 70B's real config numbers.

The reference peaks (BENCHMARKS.md, measured outside this project on an H200 capped at 79 GiB, r=16):
41.5 GiB at 1 x 2048 tokens and 51.7 GiB at 4 x 2048 for the project's recipe (no up-cast, paged
8-bit AdamW, Liger); 53.5 GiB at 1 x 2048 for up-cast + paged 32-bit AdamW + no Liger.
"""

from __future__ import annotations

import pytest

from lora_worker.runtime.model.layout import ModelResolutionError
from lora_worker.runtime.model.memory import (
    GiB,
    GpuMemoryError,
    MemoryEstimate,
    check_fits,
    estimate_memory,
    estimate_peak_gib,
)

LLAMA3_70B = {
    "num_hidden_layers": 80,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "vocab_size": 128256,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
H100_FREE = int(79.1 * GiB)  # what mem_get_info reports free on an idle 80 GB H100 after CUDA init


def est(tokens: int, **options: object) -> MemoryEstimate:
    return estimate_memory(LLAMA3_70B, lora_r=16, micro_batch_tokens=tokens, **options)  # type: ignore[arg-type]


def test_the_estimate_reproduces_the_reference_peaks() -> None:
    assert est(2048).train_peak_gib == pytest.approx(41.5, abs=1.0)
    assert est(8192).train_peak_gib == pytest.approx(51.7, abs=1.0)
    seed = est(2048, upcast_fp32=True, liger=False, optimizer="paged_adamw_32bit")
    assert seed.train_peak_gib == pytest.approx(53.5, abs=1.0)
    # The parts that are plain arithmetic: NF4 decoder linears (80 layers of q, k, v, o, gate, up,
    # down: 68.4 B parameters) at 0.5 byte + 3% constants, plus bf16 embeddings and LM head (2 x
    # 128,256 x 8,192); LoRA r=16 on all seven projections is 207 M parameters at 10 bytes.
    linears = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    assert linears == pytest.approx(68.4e9, rel=0.001)
    bf16 = 2 * 128256 * 8192 + (2 * 80 + 1) * 8192
    assert est(2048).weights_gib == pytest.approx((linears * 0.5 * 1.03 + bf16 * 2) / GiB)
    assert est(2048).lora_gib == pytest.approx(207.1e6 * 10 / GiB, rel=0.01)


def test_each_option_that_costs_memory_raises_the_estimate() -> None:
    base = est(8192)
    assert base.loss_gib == 0.0  # Liger's fused loss never holds the logits
    no_liger = est(8192, liger=False)
    # 8,192 tokens x 128,256 vocabulary x 12 bytes (bf16 logits, fp32 copy and log-softmax, gradients)
    assert no_liger.loss_gib == pytest.approx(8192 * 128256 * 12 / GiB)
    assert no_liger.train_peak_gib > base.train_peak_gib + 11
    upcast = est(8192, upcast_fp32=True)
    assert upcast.weights_gib == pytest.approx(base.weights_gib + 2 * 1.0507e9 * 2 / GiB, rel=0.01)
    assert upcast.activations_gib > 1.9 * base.activations_gib * 0.95  # fp32 residual stream
    assert est(8192, optimizer="paged_adamw_32bit").lora_gib > base.lora_gib * 1.5
    assert est(8192, optimizer="auto").lora_gib == base.lora_gib  # auto is 8-bit on CUDA
    assert est(8192, gradient_checkpointing=False).train_peak_gib > 100
    offload = est(32768, activation_offload=True)
    assert offload.train_peak_gib < est(32768).train_peak_gib - 30
    assert estimate_memory(LLAMA3_70B, lora_r=64, micro_batch_tokens=2048).lora_gib > 3.9 * est(2048).lora_gib
    assert est(2048, bits=16).weights_gib > 3.5 * est(2048).weights_gib
    with pytest.raises(ValueError, match="bits"):
        est(2048, bits=3)


def test_evaluation_holds_the_full_logits_even_with_liger() -> None:
    e = est(8192)
    logits = 8192 * 128256 * 10 / GiB  # bf16 logits + fp32 copy + fp32 log-softmax
    assert e.eval_gib > logits
    assert e.eval_peak_gib == pytest.approx(e.weights_gib + e.lora_gib + e.eval_gib)
    # At 32K tokens per forward the evaluation, not training, is the peak once activations are offloaded.
    offload = est(32768, activation_offload=True)
    assert offload.peak_gib == offload.eval_peak_gib > 80
    assert est(32768, activation_offload=True, eval_tokens=4096).peak_gib < 79.1 - 2
    assert estimate_peak_gib(LLAMA3_70B, lora_r=16, micro_batch_tokens=8192) == e.peak_gib


def test_check_fits_compares_with_free_memory_minus_the_margin() -> None:
    check_fits(est(8192), free_bytes=H100_FREE)  # ~51 GiB fits an idle H100
    e = est(16384)
    check_fits(e, free_bytes=int((e.peak_gib + 2.5) * GiB), margin_gib=2.0)
    with pytest.raises(GpuMemoryError) as busy:  # 1 GiB above the peak is free: inside the 2 GiB margin
        check_fits(e, free_bytes=int(e.peak_gib * GiB) + GiB, margin_gib=2.0)
    msg = str(busy.value)
    assert isinstance(busy.value, ModelResolutionError)
    assert f"estimated peak GPU memory {e.peak_gib:.1f} GiB" in msg
    assert f"minus a 2.0 GiB margin leaves {e.peak_gib - 1:.1f} GiB" in msg
    assert f"weights {e.weights_gib:.1f}" in msg and f"activations {e.activations_gib:.1f}" in msg
    assert "hyperparameters.micro_batch_tokens (16384 tokens now)" in msg and "max_seq_length" in msg
    assert "liger" not in msg  # Liger is already on: not something to lower


def test_the_message_names_the_options_that_cost_the_most() -> None:
    seed = est(8192, upcast_fp32=True, liger=False, optimizer="paged_adamw_32bit")
    with pytest.raises(GpuMemoryError) as err:
        check_fits(seed, free_bytes=H100_FREE)
    msg = str(err.value)
    assert "set training.liger_kernels to 'on' (the loss's full logits take" in msg
    assert "training.upcast_fp32 to false" in msg
    assert "training.optimizer to 'paged_adamw_8bit'" in msg
    with pytest.raises(GpuMemoryError, match=r"100\.0 GiB does not fit: 79\.1 GiB free"):
        check_fits(100.0, free_bytes=H100_FREE)  # a bare number works too


def test_a_config_without_the_needed_fields_is_a_clear_error() -> None:
    with pytest.raises(ModelResolutionError, match="hidden_size"):
        estimate_memory({"num_hidden_layers": 2}, lora_r=8, micro_batch_tokens=128)
