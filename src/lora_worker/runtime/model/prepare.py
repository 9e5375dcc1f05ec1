"""The base model for one job: NF4 from the verified copy on the volume when there is one, else
quantized on load from the original weights (and the copy saved for the next cold start); then
LoRA on top.

A copy that passes its checksums can still be wrong (saved from a bad load, or by another
version of bitsandbytes): when the first held-out evaluation of a model loaded from the copy is
not finite, the copy is moved aside and the model rebuilt once from the original weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lora_worker.runtime.device import free_accelerator_memory
from lora_worker.runtime.evaluation.loss import NonFiniteLoss
from lora_worker.runtime.model import nf4_cache
from lora_worker.runtime.model.load import add_lora, count_params, load_base_model
from lora_worker.runtime.model.resolve import ResolvedModel
from lora_worker.runtime.spec import JobSpec

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class LoadedModel:
    model: Any  # the PEFT model: NF4 base + LoRA adapter
    liger: bool  # whether Liger's kernels really run in this model
    trainable_params: int
    total_params: int
    from_copy: Path | None  # the NF4 copy it was loaded from, or None when quantized on load
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def info(self, device_name: str) -> dict[str, Any]:
        return {
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "liger": self.liger,
            "gpu": device_name,
            "nf4_copy": self.from_copy is not None,
            "timings_s": self.timings,
        }


def load_for_training(
    resolved: ResolvedModel, tokenizer, spec: JobSpec, volume_dir: Path, *, use_copy: bool = True
) -> LoadedModel:
    hp, tr = spec.hyperparameters, spec.training
    warnings: list[str] = []
    timings: dict[str, float] = {}
    cacheable = resolved.source != "local_dir"  # a local directory has no revision to key a copy by
    copy = None
    if cacheable and use_copy:
        used = nf4_cache.use_prequantized(volume_dir, resolved.model_id, resolved.revision)
        copy = used.path
        if used.warning:
            warnings.append(used.warning)
    t = time.monotonic()
    base = load_base_model(copy or resolved.path, prequantized=copy is not None)
    timings["load_prequantized" if copy else "load_quantize"] = round(time.monotonic() - t, 2)
    if cacheable and copy is None:
        # before the first forward pass: on the CPU bitsandbytes repacks weights at first use
        t = time.monotonic()
        target = nf4_cache.prequantized_dir(volume_dir, resolved.model_id, resolved.revision)
        try:
            nf4_cache.save_prequantized(base, tokenizer, target)
            timings["save_prequantized"] = round(time.monotonic() - t, 2)
        except Exception as err:  # a cache miss next time is not worth failing this job
            warnings.append(f"could not save the NF4 copy of the base model for later jobs: {err}")
    model, liger = add_lora(
        base,
        r=hp.lora_r,
        alpha=hp.lora_alpha,
        dropout=hp.lora_dropout,
        seed=hp.seed,
        gradient_checkpointing=tr.gradient_checkpointing,
        upcast_fp32=tr.upcast_fp32,
        liger=tr.liger_kernels,
    )
    liger = liger or liger_active(model)
    if liger and tr.liger_kernels == "off":
        warnings.append(
            "training.liger_kernels is 'off', but an earlier job in this worker process applied Liger's "
            "kernels, which cannot be removed from a running process: this job ran with them"
        )
    trainable, total = count_params(model)
    return LoadedModel(model, liger, trainable, total, copy, timings, warnings)


def load_checked(
    resolved: ResolvedModel,
    tokenizer,
    spec: JobSpec,
    volume_dir: Path,
    first_eval: Callable[[LoadedModel], T],
) -> tuple[LoadedModel, T]:
    """Load, then run `first_eval(loaded)`; a non-finite result from an NF4 copy discards the copy
    and rebuilds from the original weights once. Raises NonFiniteLoss when the rebuild fails too."""
    loaded = load_for_training(resolved, tokenizer, spec, volume_dir)
    try:
        return loaded, first_eval(loaded)
    except NonFiniteLoss as err:
        if loaded.from_copy is None:
            raise NonFiniteLoss(
                f"the base model gives a non-finite held-out loss before any training ({err}): its weights "
                f"in {resolved.path} are likely corrupt; re-download them (delete the folder) and resubmit"
            ) from None
        copy = loaded.from_copy
        moved = nf4_cache.discard_prequantized(
            copy, f"non-finite held-out loss on its first evaluation: {err}"
        )
        log.warning("NF4 copy %s gave a non-finite loss; moved to %s, rebuilding", copy, moved)
    loaded.model = None
    free_accelerator_memory()
    rebuilt = load_for_training(resolved, tokenizer, spec, volume_dir, use_copy=False)
    rebuilt.warnings.insert(
        0,
        f"the saved NF4 copy of the base model gave a non-finite loss and was moved aside to {moved}; "
        "the model was rebuilt from the original weights",
    )
    return rebuilt, first_eval(rebuilt)


def liger_active(model) -> bool:
    """Whether any module of `model` runs a Liger kernel (Liger patches classes process-wide)."""
    return any(type(m).__module__.startswith("liger_kernel") for m in model.modules())
