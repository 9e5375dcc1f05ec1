"""The base model for one job: NF4 from the verified copy on the volume when there is one, else
quantized on load from the original weights (and the copy saved for the next cold start); then
LoRA on top: a fresh adapter, a previous one to train further (warm start), or a saved one to
generate with.

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

from lora_worker.runtime.delivery.lineage import PreviousAdapter
from lora_worker.runtime.device import free_accelerator_memory
from lora_worker.runtime.evaluation.loss import NonFiniteLoss
from lora_worker.runtime.model import nf4_cache
from lora_worker.runtime.model.load import (
    LORA_TARGETS,
    add_lora,
    count_params,
    load_base_model,
    load_inference_adapter,
    lora_config_mismatch,
)
from lora_worker.runtime.model.resolve import ModelMeta, ResolvedModel
from lora_worker.runtime.parallel import fsdp
from lora_worker.runtime.spec import JobSpec
from lora_worker.runtime.tasks.adapter_source import AdapterSource, AdapterSourceError, find_adapter

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
    init_adapter: Path | None = None  # the saved adapter training starts from (warm start), if any
    sharded_over: int = 1  # FSDP ranks that each hold a share of the model (1: this process holds it whole)

    def info(self, device_name: str) -> dict[str, Any]:
        return {
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "liger": self.liger,
            "gpu": device_name,
            "nf4_copy": self.from_copy is not None,
            "sharded_over": self.sharded_over,
            "init_adapter": str(self.init_adapter) if self.init_adapter else None,
            "timings_s": self.timings,
        }


@dataclass
class NF4Base:
    model: Any  # the frozen base model in NF4
    from_copy: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def load_nf4_base(
    resolved: ResolvedModel, tokenizer, volume_dir: Path, *, use_copy: bool = True, sharded: bool = False
) -> NF4Base:
    """The base model in NF4: from the verified copy on the volume when there is one, else quantized
    on load from the original weights, saving the copy for the next cold start.

    `sharded` (FSDP-QLoRA): NF4 stored in bf16 (load.quantization_config), quantized on load by
    every rank; the copy on the volume holds the one-GPU storage and is neither used nor written."""
    warnings: list[str] = []
    timings: dict[str, float] = {}
    # a local directory has no revision to key a copy by
    cacheable = resolved.source != "local_dir" and not sharded
    copy = None
    if cacheable and use_copy:
        used = nf4_cache.use_prequantized(volume_dir, resolved.model_id, resolved.revision)
        copy = used.path
        if used.warning:
            warnings.append(used.warning)
    t = time.monotonic()
    base = load_base_model(copy or resolved.path, prequantized=copy is not None, sharded=sharded)
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
    return NF4Base(base, copy, timings, warnings)


def load_for_training(
    resolved: ResolvedModel,
    tokenizer,
    spec: JobSpec,
    volume_dir: Path,
    *,
    use_copy: bool = True,
    shard_over: int = 1,
) -> LoadedModel:
    """NF4 base + LoRA: a fresh adapter, or the one `spec.init_adapter` names (a job id on this volume
    or an adapter folder), checked against the job's LoRA settings before any weight loads.

    `shard_over` > 1: FSDP-QLoRA across that many ranks (every rank calls this): the NF4 weights
    stored for FSDP, the model sharded once LoRA is on it (parallel/fsdp.py)."""
    hp, tr = spec.hyperparameters, spec.training
    init = warm_start_source(spec, volume_dir).path if spec.init_adapter else None
    nf4 = load_nf4_base(resolved, tokenizer, volume_dir, use_copy=use_copy, sharded=shard_over > 1)
    warnings = list(nf4.warnings)
    model, liger = add_lora(
        nf4.model,
        r=hp.lora_r,
        alpha=hp.lora_alpha,
        dropout=hp.lora_dropout,
        seed=hp.seed,
        gradient_checkpointing=tr.gradient_checkpointing,
        upcast_fp32=tr.upcast_fp32,
        liger=tr.liger_kernels,
        init_adapter=init,
    )
    liger = liger or liger_active(model)
    if liger and tr.liger_kernels == "off":
        warnings.append(
            "training.liger_kernels is 'off', but an earlier job in this worker process applied Liger's "
            "kernels, which cannot be removed from a running process: this job ran with them"
        )
    trainable, total = count_params(model)  # before sharding: the whole model's
    if shard_over > 1:
        fsdp.shard_model(model, shard_over)
    return LoadedModel(model, liger, trainable, total, nf4.from_copy, nf4.timings, warnings, init, shard_over)


def load_for_inference(
    resolved: ResolvedModel, tokenizer, adapter_dir: Path, volume_dir: Path
) -> LoadedModel:
    """NF4 base (exactly as training loads it) + a saved adapter, frozen, for generation."""
    nf4 = load_nf4_base(resolved, tokenizer, volume_dir)
    t = time.monotonic()
    model = load_inference_adapter(nf4.model, adapter_dir)
    timings = {**nf4.timings, "load_adapter": round(time.monotonic() - t, 2)}
    trainable, total = count_params(model)
    return LoadedModel(model, False, trainable, total, nf4.from_copy, timings, nf4.warnings, adapter_dir)


# -------------------------------------------------------------------------------- warm start


class WarmStartRefused(ValueError):
    """`init_adapter` cannot start this job; `problems` lists why (each starting with the field)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid job input:\n" + "\n".join(f"  - {p}" for p in problems))


def warm_start_source(spec: JobSpec, volume_dir: Path) -> AdapterSource:
    """The adapter `spec.init_adapter` names, once its LoRA config matches the job's (r, alpha,
    target modules); WarmStartRefused otherwise. Reads adapter_config.json only: call it at plan
    time, before any weights load."""
    try:
        source = find_adapter(str(spec.init_adapter), volume_dir, field="init_adapter")
    except AdapterSourceError as err:
        raise WarmStartRefused([str(err)]) from None
    hp = spec.hyperparameters
    mismatch = lora_config_mismatch(source.config, r=hp.lora_r, alpha=hp.lora_alpha, targets=LORA_TARGETS)
    if mismatch:
        raise WarmStartRefused(
            [f"init_adapter: {spec.init_adapter!r} cannot start this job: {p}" for p in mismatch]
            + ["init_adapter: give the job the previous adapter's LoRA settings, or leave init_adapter out"]
        )
    return source


def check_warm_start(
    spec: JobSpec, volume_dir: Path, meta: ModelMeta, warnings: list[str]
) -> PreviousAdapter | None:
    """The adapter a warm start begins from, checked against the job's LoRA settings and base model
    from config files alone (before any weight loads); None without `init_adapter`."""
    if not spec.init_adapter:
        return None
    source = warm_start_source(spec, volume_dir)
    problems, notes = warm_start_base_problems(source, meta.model_id, meta.revision)
    if problems:
        raise WarmStartRefused(problems)
    warnings += notes
    return source.as_previous()


def warm_start_base_problems(
    source: AdapterSource, model_id: str, revision: str | None
) -> tuple[list[str], list[str]]:
    """(problems, warnings) of training `source` further on the base `model_id`@`revision`: another
    base model is refused; another commit of the same one is allowed with a warning."""
    if source.base_model is None or _same_model(source.base_model, model_id):
        if source.base_revision and revision and source.base_revision != revision:
            return [], [
                f"init_adapter was trained on {model_id} at commit {source.base_revision}; this job uses commit "
                f"{revision}"
            ]
        return [], []
    return [
        f"init_adapter: it was trained on the base model {source.base_model}, this job trains on {model_id}; "
        "an adapter only fits the base it was trained on"
    ], []


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def held_out_with_adapter(
    model, adapter_dir: Path, measure: Callable[[Any], T], *, name: str = "previous"
) -> T:
    """`measure(model)` with the saved adapter `adapter_dir` active in place of the model's own, then
    the model's own adapter back, unchanged (e.g. the previous adapter's held-out loss after a warm-
    started job trained, measured on the same held-out set as the new one)."""
    own = model.active_adapter
    model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
    try:
        model.set_adapter(name)
        return measure(model)
    finally:
        model.set_adapter(own)
        model.delete_adapter(name)


def load_checked(
    resolved: ResolvedModel,
    tokenizer,
    spec: JobSpec,
    volume_dir: Path,
    first_eval: Callable[[LoadedModel], T],
    shard_over: int = 1,
) -> tuple[LoadedModel, T]:
    """Load, then run `first_eval(loaded)`; a non-finite result from an NF4 copy discards the copy
    and rebuilds from the original weights once. Raises NonFiniteLoss when the rebuild fails too.
    `shard_over`: as load_for_training's (a sharded model never comes from the copy)."""
    loaded = load_for_training(resolved, tokenizer, spec, volume_dir, shard_over=shard_over)
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
