"""GPU memory of a QLoRA job, estimated from the model's config.json before any weight is loaded.

`estimate_memory` adds up what lives on the GPU at the training peak (NF4 weights, the LoRA weights,
gradients and optimizer states, the checkpointed activations, one layer's recompute and, without
Liger, the loss's full logits) and at the evaluation peak (the forward pass materializes the full
logits even with Liger, whose fused loss runs only in training). `check_fits` compares the larger
peak with the GPU's FREE memory minus a margin and says what to lower.

Calibration, honestly: no GPU has run in this project yet (BENCHMARKS.md, "Status"). The only peaks
are the reference figures quoted in BENCHMARKS.md, measured outside this project on an H200 capped
at 79 GiB with Llama 3 70B's shape and r=16: 41.5 GiB at 1 x 2048 tokens (no up-cast, paged 8-bit
AdamW, Liger), 51.7 GiB at 4 x 2048 (same recipe), 53.5 GiB at 1 x 2048 for the up-cast / 32-bit
AdamW / no-Liger recipe. The formula reproduces those within about 1 GiB; the allocator-
fragmentation term is fitted to the 8,192-token point. Everything else (16K tokens and beyond,
activation offload, no checkpointing, the evaluation peak) is arithmetic, not measurement: an
ESTIMATE until the GPU check records real peaks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from lora_worker.runtime.model.layout import ModelResolutionError

GiB = 1024**3
DEFAULT_MARGIN_GIB = 2.0
"""Kept free beyond the estimate: its error against the reference peaks (~1 GiB) plus memory outside
PyTorch's allocator (cuBLAS workspaces, bitsandbytes' paged optimizer pages before they spill)."""

# Bytes per LoRA parameter beyond its fp32 weight (4) and fp32 gradient (4): AdamW's two states.
_OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2, "paged_adamw_32bit": 8, "adamw_torch": 8}


class GpuMemoryError(ModelResolutionError):
    """The estimated QLoRA peak does not fit the free GPU memory; the message says what to lower."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated GPU memory in GiB, by part, and the options it assumed."""

    weights_gib: float  # the frozen base: NF4 linears + bf16 (fp32 when up-cast) embeddings, head, norms
    lora_gib: float  # LoRA weights + gradients + optimizer states
    activations_gib: float  # checkpointed layer inputs + one layer's recompute + fragmentation
    loss_gib: float  # training loss's full logits (0 with Liger's fused linear cross-entropy)
    eval_gib: float  # evaluation forward beyond the weights: one layer's working set + full logits
    micro_batch_tokens: int
    eval_tokens: int
    upcast_fp32: bool
    liger: bool
    optimizer: str

    @property
    def train_peak_gib(self) -> float:
        return self.weights_gib + self.lora_gib + self.activations_gib + self.loss_gib

    @property
    def eval_peak_gib(self) -> float:
        return self.weights_gib + self.lora_gib + self.eval_gib

    @property
    def peak_gib(self) -> float:
        return max(self.train_peak_gib, self.eval_peak_gib)

    def as_dict(self) -> dict[str, Any]:
        parts = {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return {
            **parts,
            "train_peak_gib": round(self.train_peak_gib, 2),
            "eval_peak_gib": round(self.eval_peak_gib, 2),
        }


@dataclass(frozen=True)
class _Shape:
    hidden: int
    inter: int
    layers: int
    vocab: int
    q_dim: int
    kv_dim: int
    tied: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> _Shape:
        try:
            h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or h // heads)
            return cls(
                hidden=h,
                inter=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                vocab=int(config["vocab_size"]),
                q_dim=heads * head_dim,
                kv_dim=kv_heads * head_dim,
                tied=bool(config.get("tie_word_embeddings")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelResolutionError(f"config.json lacks what the memory estimate needs: {e!r}") from None

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of the 7 projections LoRA targets in each decoder layer."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.inter
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def layer_working_set_bytes(self, tokens: int) -> int:
        """One decoder layer's bf16 intermediates: the MLP's gate/up/act outputs, attention q/k/v/o
        and a norm output."""
        return tokens * (3 * self.inter + 2 * self.q_dim + 2 * self.kv_dim + self.hidden) * 2


def estimate_memory(
    config: dict[str, Any],
    *,
    lora_r: int,
    micro_batch_tokens: int,
    eval_tokens: int | None = None,
    upcast_fp32: bool = False,
    liger: bool = True,
    optimizer: str = "paged_adamw_8bit",
    gradient_checkpointing: bool = True,
    activation_offload: bool = False,
    bits: int = 4,
) -> MemoryEstimate:
    """Estimated GPU memory of QLoRA training and evaluation, from config.json and the job's options.

    `micro_batch_tokens`: rows x padded length of the largest micro-batch; `eval_tokens`: of one
    evaluation forward (default the same); `liger`: whether Liger's kernels will run (not the
    `auto` setting); `optimizer`: `paged_adamw_8bit` (what `auto` picks on CUDA), `paged_adamw_32bit`
    or `adamw_torch`; `activation_offload`: checkpointed layer inputs kept in host memory.
    """
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, not {bits}")
    shape = _Shape.of(config)
    tokens = int(micro_batch_tokens)
    eval_n = int(eval_tokens if eval_tokens is not None else tokens)

    linear_params = shape.layers * sum(i * o for i, o in shape.projections())
    # bitsandbytes quantizes only the decoder's Linear layers; embeddings, head and norms stay bf16,
    # or fp32 after prepare_model_for_kbit_training's up-cast.
    other_params = (
        shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden
    )
    quant_constants = {4: 0.03, 8: 0.005, 16: 0.0}[bits]  # NF4 double-quant absmax ~3% of the 0.5 B/param
    weights = linear_params * bits / 8 * (1 + quant_constants) + other_params * (4 if upcast_fp32 else 2)

    lora_params = shape.layers * lora_r * sum(i + o for i, o in shape.projections())
    state = _OPTIMIZER_STATE_BYTES.get("paged_adamw_8bit" if optimizer == "auto" else optimizer, 8)
    lora = lora_params * (4 + 4 + state)

    # Up-cast norms and embeddings in fp32 promote the residual stream to fp32: 4 bytes per value.
    residual_bytes = 4 if upcast_fp32 else 2
    layer_input = shape.hidden * tokens * residual_bytes
    working = shape.layer_working_set_bytes(tokens)
    if not gradient_checkpointing:
        kept = shape.layers * (working + layer_input)  # every layer keeps its intermediates for backward
    elif activation_offload:
        kept = 2 * layer_input  # the layer being recomputed and the next one's input in flight
    else:
        kept = shape.layers * layer_input  # non-reentrant checkpointing keeps each layer's input
    # The caching allocator's fragmentation grows with block sizes, i.e. with tokens per micro-batch:
    # fitted to the 8,192-token reference peak (+6% of activations there).
    activations = (kept + working) * (1 + tokens / 131072)

    logit_bytes = 4 if upcast_fp32 else 2
    # Without Liger the loss holds the logits (bf16, or fp32 from an up-cast head), their fp32 copy
    # and log-softmax, and the backward adds fp32 and bf16 gradients: ~10 more bytes per value.
    loss = 0 if liger else tokens * shape.vocab * (logit_bytes + 10)
    # Evaluation: no activations kept, but the full logits (+ fp32 copy + log-softmax), Liger or not.
    evaluation = shape.layer_working_set_bytes(eval_n) + eval_n * shape.vocab * (logit_bytes + 8)

    return MemoryEstimate(
        weights_gib=weights / GiB,
        lora_gib=lora / GiB,
        activations_gib=activations / GiB,
        loss_gib=loss / GiB,
        eval_gib=evaluation / GiB,
        micro_batch_tokens=tokens,
        eval_tokens=eval_n,
        upcast_fp32=upcast_fp32,
        liger=liger,
        optimizer=optimizer,
    )


def sharded_memory(estimate: MemoryEstimate, world: int, layers: int) -> MemoryEstimate:
    """Per GPU under FSDP across `world` GPUs: the weights, LoRA weights and optimizer state split
    `world` ways, plus two decoder layers' weights whole (the one computing and the next, prefetched),
    each taken as 1/`layers` of the weights (embeddings and head included: an over-estimate).
    Activations and logits are a micro-batch's, as on one GPU."""
    whole_layer = estimate.weights_gib / max(1, layers)
    return replace(
        estimate,
        weights_gib=estimate.weights_gib / world + 2 * whole_layer,
        lora_gib=estimate.lora_gib / world,
    )


def estimate_peak_gib(config: dict[str, Any], **options: Any) -> float:
    """`estimate_memory(config, **options).peak_gib`."""
    return estimate_memory(config, **options).peak_gib


def check_fits(
    estimate: MemoryEstimate | float, *, free_bytes: int, margin_gib: float = DEFAULT_MARGIN_GIB
) -> None:
    """Raise GpuMemoryError, in GiB and naming what to lower, when the estimated peak does not fit
    in `free_bytes` (the GPU's free memory, e.g. `torch.cuda.mem_get_info()[0]`) minus `margin_gib`."""
    peak = estimate.peak_gib if isinstance(estimate, MemoryEstimate) else float(estimate)
    usable = free_bytes / GiB - margin_gib
    if peak <= usable:
        return
    detail = _breakdown(estimate) if isinstance(estimate, MemoryEstimate) else ""
    raise GpuMemoryError(
        f"estimated peak GPU memory {peak:.1f} GiB{detail} does not fit: {free_bytes / GiB:.1f} GiB free on "
        f"this GPU minus a {margin_gib:.1f} GiB margin leaves {usable:.1f} GiB. "
        + _what_to_lower(estimate if isinstance(estimate, MemoryEstimate) else None)
    )


def _breakdown(e: MemoryEstimate) -> str:
    return (
        f" (training {e.train_peak_gib:.1f}: weights {e.weights_gib:.1f}, LoRA and optimizer {e.lora_gib:.1f}, "
        f"activations {e.activations_gib:.1f}, loss logits {e.loss_gib:.1f}; evaluation {e.eval_peak_gib:.1f})"
    )


def _what_to_lower(e: MemoryEstimate | None) -> str:
    tips = []
    if e is not None and not e.liger and e.loss_gib >= 1.0:
        tips.append(f"set training.liger_kernels to 'on' (the loss's full logits take {e.loss_gib:.1f} GiB)")
    if e is not None and e.upcast_fp32:
        tips.append("set training.upcast_fp32 to false (fp32 embeddings, head and residual stream)")
    if e is not None and e.optimizer in ("paged_adamw_32bit", "adamw_torch"):
        tips.append("set training.optimizer to 'paged_adamw_8bit'")
    tokens = f" ({e.micro_batch_tokens} tokens now)" if e is not None else ""
    tips.append(
        f"lower hyperparameters.micro_batch_tokens{tokens}, or batch_size x max_seq_length, which also "
        "sizes each evaluation forward"
    )
    tips.append("lower hyperparameters.lora_r")
    return "Lower the memory: " + "; ".join(tips) + "; or run on a GPU with more memory."
