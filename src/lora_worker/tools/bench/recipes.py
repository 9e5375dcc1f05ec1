"""The recipes the bench times, each turned into a ready Trainer, and the clock that times its steps.

- `project` / `packed`: the worker's own path, unchanged: `add_lora` (no fp32 up-cast, non-reentrant
  checkpointing, Liger on CUDA when installed) + `build_trainer` with `optimizer="auto"` (paged
  8-bit AdamW on CUDA), fed synthetic examples planned into micro-batches of a token budget
  (right-padded rows without a mask; `packed`: documents back to back with a block-diagonal mask).
- `project-offload`: `project` with `training.activation_offload` on: the decoder's saved
  activations kept in pinned host memory (`install_activation_offload`, as `train()` installs it),
  the lever for budgets whose checkpointed activations do not fit on the card.
- `seed`: the seed document's recipe as shared/tools/seed_recipe_baseline.py runs it:
  `prepare_model_for_kbit_training` (fp32 up-cast), `paged_adamw_32bit`, a plain HF `Trainer` on
  `rows x seq` random rows with an all-ones mask and labels on every token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import Trainer, TrainerCallback, TrainingArguments

from lora_worker.runtime.model.load import LORA_TARGETS, add_lora
from lora_worker.runtime.training.offload import install_activation_offload
from lora_worker.runtime.training.trainer import TrainConfig, build_trainer
from lora_worker.tools.bench.nf4_model import synthetic_examples
from lora_worker.tools.bench.shapes import Shape

LEARNING_RATE = 2e-4


class StepClock(TrainerCallback):
    """Times each optimizer step between device synchronisations (seconds)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.steps: list[float] = []
        self.ends: list[float] = []  # clock at each step's end: intervals include data loading
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        self.steps.append(now - self._t0)
        self.ends.append(now)


def project_trainer(model, cfg: dict, device: str, workdir: Path, clock: StepClock) -> tuple[Any, dict]:
    """The worker's training path (recipe `project`, `project-offload` with activation offload, or
    `packed` for one packed row per micro-batch)."""
    model, liger_used = add_lora(
        model,
        r=cfg["lora_r"],
        alpha=cfg["lora_alpha"],
        dropout=cfg["lora_dropout"],
        seed=cfg["seed"],
        gradient_checkpointing=True,
        upcast_fp32=False,
        liger="auto",  # on CUDA when liger-kernel is installed; never on the CPU
    )
    rows, seq, steps = cfg["rows"], cfg["seq"], cfg["steps"]
    offload = cfg["recipe"] == "project-offload"
    shape = Shape(**cfg["shape"])
    examples = synthetic_examples(
        rows * steps, seq, shape.vocab, label_fraction=cfg["label_fraction"], seed=cfg["seed"]
    )
    tcfg = TrainConfig(
        output_dir=workdir / "checkpoints",
        logging_dir=workdir / "tensorboard",
        num_epochs=1,
        learning_rate=LEARNING_RATE,
        warmup_ratio=0.0,
        gradient_accumulation_steps=1,  # one micro-batch per timed step
        micro_batch_tokens=rows * seq,
        max_rows=rows,
        seed=cfg["seed"],
        optimizer="auto",
        checkpoint_steps=10**9,  # no checkpoint inside the timed steps
        logging_steps=1,
        gradient_checkpointing=True,
        packing="packed" if cfg["recipe"] == "packed" else "rows",
        report_to=(),
        activation_offload=offload,
    )
    trainer, plan = build_trainer(model, examples, shape.vocab - 1, tcfg, [clock])
    if tcfg.activation_offload:
        # train() installs the hooks around its Trainers; the bench drives one Trainer itself. The
        # child process ends after this one configuration, which takes the hooks with it.
        install_activation_offload(model)
    if len(plan) != steps or any(len(b) != rows for b in plan):
        raise RuntimeError(
            f"planner made {[len(b) for b in plan]} rows per micro-batch, expected {rows} x {steps}"
        )
    info = {
        "liger": liger_used,
        "upcast_fp32": False,
        "gradient_checkpointing": "non-reentrant",
        "activation_offload": offload,
        "tokens_per_step": rows * seq,
        "labelled_tokens_per_step": sum(examples[i].trainable_tokens for i in plan[0]),
    }
    return trainer, info


class SeedRows(torch.utils.data.Dataset):
    """The seed script's data: random rows, labels on every token, an all-ones attention mask."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, self.vocab, (self.seq,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def seed_trainer(model, cfg: dict, device: str, workdir: Path, clock: StepClock) -> tuple[Any, dict]:
    """The seed recipe (fp32 up-cast, paged 32-bit AdamW, plain Trainer)."""
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(cfg["seed"])
    lora = LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=LORA_TARGETS,
    )
    model = get_peft_model(model, lora)
    rows, seq, steps = cfg["rows"], cfg["seq"], cfg["steps"]
    wanted = "paged_adamw_32bit"
    # bitsandbytes' paged optimizers need CUDA: on the CPU the seed recipe falls back to AdamW.
    optim = wanted if device == "cuda" else "adamw_torch"
    args = TrainingArguments(
        output_dir=str(workdir / "seed"),
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        bf16=True,
        optim=optim,
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        lr_scheduler_type="cosine",
        max_grad_norm=0.3,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    data = SeedRows(rows * steps, seq, cfg["shape"]["vocab"])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[clock])
    info = {
        "liger": False,
        "upcast_fp32": True,
        "gradient_checkpointing": "Trainer default",
        "activation_offload": False,
        "tokens_per_step": rows * seq,
        "labelled_tokens_per_step": rows * (seq - 1),
    }
    if optim != wanted:
        info["optimizer_note"] = f"{wanted} needs CUDA; the seed recipe fell back to {optim} on the CPU"
    return trainer, info


def make_trainer(model, cfg: dict, device: str, workdir: Path, clock: StepClock) -> tuple[Any, dict]:
    """The Trainer of `cfg["recipe"]` and what the record should say about it."""
    make = seed_trainer if cfg["recipe"] == "seed" else project_trainer
    return make(model, cfg, device, workdir, clock)
