"""One FSDP training run on the tiny model, for tests/test_fsdp.py: run by torchrun (or plain python
for one process), it trains the project's micro-batch schedule with the stock Trainer and writes
what the test compares (per-step losses, how the model was sharded) as JSON from rank 0.

    python fsdp_run.py MODEL OUT MODE DEVICE [RESUME]

MODE
  lora-at-load  bf16 weights sharded at load by Transformers' own FSDP2 (`DistributedConfig`), LoRA
                on top; the Trainer refuses to checkpoint such a model's optimizer, so nothing is saved.
  qlora-fully-shard
                the same NF4-in-bf16 model with LoRA, sharded by PyTorch's `fully_shard` (every decoder
                layer, then the root: what Accelerate's FSDP2 plugin does) when there is more than
                one rank, trained by a plain loop in which every rank trains every micro-batch: a
                check of the sharded QLoRA model (NF4 shards gathered for each layer's forward, LoRA
                gradients reduce-scattered, optimizer steps on sharded LoRA weights), which runs on
                the CPU, where the Trainer's FSDP does not.
  qlora         FSDP-QLoRA as the PEFT and bitsandbytes docs give it: NF4 weights stored in bf16
                (`bnb_4bit_quant_storage`, so FSDP can shard them with the bf16 weights), LoRA added
                before wrapping, then Accelerate's FSDP2 plugin (the Trainer's `fsdp` arguments) wraps
                every decoder layer and the root when there is more than one rank. Checkpoints every
                2 steps with full (gathered) state dicts.
DEVICE  cpu (gloo) or cuda (NCCL).
RESUME  a checkpoint folder to resume from (another run's, on any number of processes).

Accelerate's FSDP plugin makes the Trainer build the optimizer and the schedule itself (it refuses
ready ones), so both sides of a comparison use the Trainer's: the optimizer the job's settings name
and a constant learning rate.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback
from transformers.distributed import DistributedConfig

sys.path.insert(0, str(Path(__file__).parent))
from training_builders import PAD_ID, lora_model, synthetic_examples, train_config  # noqa: E402

from lora_worker.runtime.model.load import quantization_config  # noqa: E402
from lora_worker.runtime.training.ranks import shard_schedule  # noqa: E402
from lora_worker.runtime.training.schedule import build_optimizer  # noqa: E402
from lora_worker.runtime.training.trainer import (  # noqa: E402
    MicroBatches,
    make_schedule,
    plan_batches,
    training_arguments,
)

FSDP2_PLUGIN = {
    "fsdp_version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    "state_dict_type": "FULL_STATE_DICT",  # checkpoints load on any number of processes
    "reshard_after_forward": True,
}


def load(model_dir: str, mode: str, device: str, world: int):
    # on CUDA each rank loads onto its own card (the tiny model fits; a real FSDP-QLoRA load keeps the
    # weights on the CPU until Accelerate shards them: its `cpu_ram_efficient_loading`)
    kwargs: dict = {"device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}} if device == "cuda" else {}
    if mode == "lora-at-load" and world > 1:
        kwargs["distributed_config"] = DistributedConfig(fsdp_size=world)
    if mode.startswith("qlora"):
        # the worker's NF4 settings, stored in bf16 so FSDP can shard them
        kwargs["quantization_config"] = quantization_config(sharded=True)
    return lora_model(Path(model_dir), seed=0, checkpointing=False, **kwargs)


class StepsRun(TrainerCallback):
    """The optimizer steps this process ran (a resumed run's log history also holds the earlier ones)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def sharding(model) -> dict:
    """How the trained model is held: the decoder layer's class and the share of a base weight this rank keeps."""
    layer = model.base_model.model.model.layers[0]
    weight = layer.self_attn.q_proj.base_layer.weight
    local = weight.to_local().numel() if isinstance(weight, DTensor) else weight.numel()
    return {"layer": type(layer).__name__, "base_weight_share": local / weight.numel()}


def train_fully_sharded(model, examples, schedule, cfg, device: str, world: int) -> dict:
    """Every rank trains every micro-batch of the schedule (`fully_shard` when world > 1); the
    per-step losses and the norm of every LoRA weight, gathered whole, after the last step."""
    if world > 1:
        dist.init_process_group("gloo")
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = build_optimizer(model, training_arguments(cfg, device))
    batches, accumulation = MicroBatches(examples, schedule, PAD_ID), cfg.gradient_accumulation_steps
    losses: dict[int, float] = {}
    for step, start in enumerate(range(0, len(schedule), accumulation), start=1):
        micro = [batches[i] for i in range(start, min(start + accumulation, len(schedule)))]
        total = 0.0
        for batch in micro:
            loss = model(**batch).loss / len(micro)
            loss.backward()
            total += float(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses[step] = total
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    norms = {k: float(v.float().norm()) for k, v in full.items() if "lora_" in k}
    return {**sharding(model), "losses": losses, "lora_norms": norms}


def main() -> None:
    model_dir, out, mode, device = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    model = load(model_dir, mode, device, world)

    examples = synthetic_examples(12)
    cfg = train_config(
        out.parent / out.stem, num_epochs=2, gradient_accumulation_steps=4, micro_batch_tokens=64, max_rows=2,
        checkpoint_steps=2,
    )  # fmt: skip
    schedule = make_schedule(plan_batches(examples, cfg), cfg.num_epochs, cfg.seed)
    if mode == "qlora-fully-shard":
        result = train_fully_sharded(model, examples, schedule, cfg, device, world)
        if int(os.environ.get("RANK", "0")) == 0:
            out.write_text(json.dumps(result))
        return
    sharded, per_rank = shard_schedule(schedule, cfg.gradient_accumulation_steps, world)
    args = training_arguments(replace(cfg, gradient_accumulation_steps=per_rank), device)
    args = replace(args, lr_scheduler_type="constant", save_strategy="steps" if mode == "qlora" else "no")
    if mode == "qlora" and world > 1:
        args = replace(args, fsdp="full_shard auto_wrap", fsdp_config=FSDP2_PLUGIN)
    ran = StepsRun()
    trainer = Trainer(
        model=model, args=args, train_dataset=MicroBatches(examples, sharded, PAD_ID), data_collator=lambda b: b[0],
        optimizer_cls_and_kwargs=Trainer.get_optimizer_cls_and_kwargs(args, model), callbacks=[ran],
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        records = [r for r in trainer.state.log_history if "loss" in r]
        out.write_text(
            json.dumps({
                **sharding(trainer.model),
                "losses": {r["step"]: r["loss"] for r in records},
                "steps_run": ran.steps,
                "checkpoints": str(cfg.output_dir),
            })
        )  # fmt: skip


if __name__ == "__main__":
    main()
