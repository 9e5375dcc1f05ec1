"""FSDP-QLoRA: the NF4 base sharded across the job's ranks by PyTorch's FSDP2 (`fully_shard`), LoRA
trained on the stock Trainer, checkpoints in the same files as one process writes.

The recipe is the one the PEFT and bitsandbytes docs give: the NF4 weights are stored in bf16
(`bnb_4bit_quant_storage`, model/load.py) so FSDP can shard them beside the bf16 weights, and LoRA
is added before sharding. Every decoder layer is one FSDP unit (its NF4 shards all-gathered for its
forward and backward, its LoRA gradients reduce-scattered), the root holds the embeddings, the final
norm and the head. Sharding is local (no collective): every rank loads the same files and keeps its
own share.

The Trainer's own FSDP (Accelerate's plugin) refuses a ready optimizer and schedule and, on the CPU,
falls back to DDP, which cannot hold DTensor parameters. A model that arrives sharded takes the
Trainer's path for models sharded at load time instead (no DDP wrap, our optimizer, gradient sync
deferred to the last micro-batch of a step); Transformers marks such a model only from its own
loader (`DistributedConfig`, which shards NF4 weights before PEFT can add LoRA), so `mark_sharded`
sets the same flag on a model sharded here. That path saves no optimizer state, so checkpoints are
written here (`save_checkpoint`): full state dicts gathered to rank 0, in the Trainer's file layout
with an index-keyed `optimizer.pt`, so a checkpoint of N sharded ranks resumes on one process, on
data-parallel ranks or on another number of sharded ranks (`load_resume_state`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

# gathered to rank 0 only, on the CPU: the other ranks get empty dicts
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
TRAINER_FILES = ("trainer_state.json",)  # what the Trainer reads of a resume folder besides the adapter


def shard_model(model, world: int):
    """Shard `model` (a PeftModel, LoRA already added) across the default process group: every decoder
    layer, then the root. In place; returns the model."""
    base = model.get_base_model()  # a Llama-architecture causal LM
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(base)
    mark_sharded(base, world)
    return model


def mark_sharded(base, world: int) -> None:
    """Tell the Trainer that `base` is already sharded: it then neither wraps it in DDP nor shards it
    again, trains it with the optimizer it is given, and defers gradient sync within a step."""
    base._is_distributed_loading_by_transformers = True  # noqa: SLF001  Transformers sets it only at load
    base.config.distributed_config = DistributedConfig(fsdp_size=world)


def is_sharded(model) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_norm_squared(p: torch.Tensor) -> float:
    """Squared L2 norm of a parameter, whole (a DTensor shard's norm is summed over the ranks: a
    collective, so every rank calls it for the same parameters)."""
    local = p.detach().float()
    if isinstance(p, DTensor):
        local = local.to_local()
        total = local.pow(2).sum()
        dist.all_reduce(total)
        return float(total)
    return float(local.pow(2).sum())


def gather_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's full state dict, on rank 0's CPU ({} elsewhere). Collective: every rank calls it."""
    return get_model_state_dict(model, options=FULL_ON_RANK0)


def trainable_names(model) -> list[str]:
    """The trainable parameters' names in the order build_optimizer gives them to the optimizer."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def to_index_keyed(full: dict, names: list[str]) -> dict:
    """A full optimizer state dict keyed by parameter names (torch.distributed.checkpoint's) as
    `optimizer.state_dict()` of one process keys it: by position among the optimizer's parameters."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: s for n, s in full["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]],
    }


def to_name_keyed(saved: dict, names: list[str]) -> dict:
    """The reverse of to_index_keyed: a one-process `optimizer.pt` for set_optimizer_state_dict."""
    return {
        "state": {names[int(i)]: s for i, s in saved["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]
        ],
    }


def save_checkpoint(model, optimizer, scheduler, state, folder: Path) -> Path:
    """Write `folder/checkpoint-<step>/` as the Trainer writes it for one process (adapter, optimizer,
    schedule, trainer state), from the shards of every rank. Collective: every rank calls it; rank 0
    writes. Returns the checkpoint folder."""
    ckpt = Path(folder) / f"checkpoint-{state.global_step}"
    weights = gather_state_dict(model)
    optim = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(ckpt, state_dict=weights, safe_serialization=True, save_embedding_layers=False)
        torch.save(to_index_keyed(optim, trainable_names(model)), ckpt / "optimizer.pt")
        torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
        state.save_to_json(str(ckpt / "trainer_state.json"))
    return ckpt


def load_resume_state(model, optimizer, scheduler, checkpoint: Path, staging: Path) -> str:
    """Load a checkpoint's optimizer and schedule (written by any number of processes, sharded or
    not) into this rank's shards, and return the folder to hand the Trainer's `resume_from_checkpoint`:
    the checkpoint's adapter and trainer state without the optimizer, which the Trainer would load
    whole into a sharded optimizer."""
    checkpoint = Path(checkpoint)
    saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(
        model,
        optimizer,
        to_name_keyed(saved, trainable_names(model)),
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.name.startswith("adapter_") or f.name in TRAINER_FILES:
            (staging / f.name).symlink_to(f.resolve())
    return str(staging)
