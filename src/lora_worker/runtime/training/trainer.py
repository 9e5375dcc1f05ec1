"""Training on the stock Transformers Trainer, fed whole micro-batches, with OOM recovery.

The Trainer sees a dataset whose items are ready micro-batches, in the order they will be
trained: every epoch's micro-batches (planned by `data.plan_micro_batches` or `data.plan_packed`
within a token budget) shuffled with the job's seed, one epoch after another, read sequentially.
So `per_device_train_batch_size` is 1, the collator unwraps, and a checkpoint's step number alone
fixes the data position. Loss is averaged over the trained tokens of all micro-batches in an
optimizer step (the Trainer passes `num_items_in_batch`), so long and short examples weigh per token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lora_worker.runtime.data.formats import Example, collate, collate_packed, plan_micro_batches, plan_packed
from lora_worker.runtime.training.callbacks import COMPLETE_MARKER, clean_incomplete, complete_checkpoints

log = logging.getLogger(__name__)


class MicroBatches(torch.utils.data.Dataset):
    def __init__(
        self, examples: Sequence[Example], schedule: list[list[int]], pad_id: int, packed: bool = False
    ):
        self.examples, self.schedule, self.pad_id, self.packed = examples, schedule, pad_id, packed

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, i: int) -> dict:
        batch = [self.examples[j] for j in self.schedule[i]]
        if not batch:  # the empty half of a one-row micro-batch split after an OOM: nothing to learn
            return {"input_ids": torch.full((1, 8), self.pad_id), "labels": torch.full((1, 8), -100)}
        return collate_packed(batch) if self.packed else collate(batch, self.pad_id)


def make_schedule(plan: list[list[int]], epochs: int, seed: int) -> list[list[int]]:
    """Every epoch's micro-batches in a seeded order, one epoch after another."""
    import random

    out: list[list[int]] = []
    for epoch in range(epochs):
        order = list(range(len(plan)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out += [plan[i] for i in order]
    return out


def split_schedule(schedule: list[list[int]]) -> list[list[int]]:
    """Each micro-batch becomes two consecutive halves (a one-row micro-batch: itself and an empty one).

    With gradient accumulation doubled, every optimizer step then sees exactly the same examples
    in the same order as before, and step N still starts at the same place in the data.
    """
    out: list[list[int]] = []
    for b in schedule:
        half = (len(b) + 1) // 2
        out += [b[:half], b[half:]]
    return out


def plan_batches(examples: Sequence[Example], cfg: TrainConfig) -> list[list[int]]:
    lengths = [len(e.input_ids) for e in examples]
    if cfg.packing == "packed":
        return plan_packed(lengths, token_budget=cfg.micro_batch_tokens)
    return plan_micro_batches(lengths, token_budget=cfg.micro_batch_tokens, max_rows=cfg.max_rows)


def _unwrap(items: list[dict]) -> dict:
    return items[0]


@dataclass(frozen=True)
class TrainConfig:
    """Plain values the trainer needs (from the job spec's hyperparameters and training options)."""

    output_dir: Path
    logging_dir: Path
    num_epochs: int
    learning_rate: float
    warmup_ratio: float
    gradient_accumulation_steps: int
    micro_batch_tokens: int
    max_rows: int
    seed: int
    optimizer: str
    checkpoint_steps: int
    logging_steps: int
    gradient_checkpointing: bool
    packing: str = "rows"  # "rows": one example per right-padded row; "packed": one row, block mask
    report_to: tuple[str, ...] = ("tensorboard",)


@dataclass
class TrainOutcome:
    global_step: int
    max_steps: int
    epoch: float
    train_loss: float | None
    train_seconds: float
    resumed_from_step: int | None
    recoveries: list[dict] = field(default_factory=list)
    micro_batch_tokens: int = 0
    gradient_accumulation_steps: int = 0
    stopped_reason: str | None = None
    padding_fraction: float = 0.0
    epochs_this_run: float = 0.0  # epochs trained by this process (less than `epoch` after a resume)
    log_history: list[dict] = field(default_factory=list)  # the Trainer's, carried across resumes


def resolve_optimizer(name: str, device: str) -> str:
    if name != "auto":
        return name
    # 8-bit paged AdamW needs bitsandbytes' CUDA kernels; on the CPU plain AdamW.
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


def build_trainer(
    model,
    examples: Sequence[Example],
    pad_id: int,
    cfg: TrainConfig,
    callbacks: list,
    schedule: list[list[int]] | None = None,
):
    """A stock Trainer over the job's micro-batch schedule; returns (trainer, schedule)."""
    import dataclasses

    from transformers import Trainer, TrainingArguments

    if schedule is None:
        schedule = make_schedule(plan_batches(examples, cfg), cfg.num_epochs, cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sequential_arg = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}
    args = TrainingArguments(
        output_dir=str(cfg.output_dir),
        num_train_epochs=1,  # one pass over the schedule, which holds every epoch
        per_device_train_batch_size=1,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_grad_norm=0.3,
        weight_decay=0.0,
        optim=resolve_optimizer(cfg.optimizer, device),
        bf16=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.checkpoint_steps,
        save_total_limit=None,  # rotation is CheckpointCallback's, which keeps the last two complete ones
        eval_strategy="no",  # held-out loss is computed by EvalCallback, the same way before and after
        report_to=[r for r in cfg.report_to if r != "tensorboard"],
        # activation checkpointing is already enabled (non-reentrant) on the model by model.add_lora
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        disable_tqdm=True,
        save_only_model=False,
        **({"train_sampling_strategy": "sequential"} if sequential_arg else {}),
    )
    if "tensorboard" in cfg.report_to:
        # An explicit writer: Transformers 5 otherwise logs under output_dir (the checkpoints folder).
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks = [*callbacks, TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(cfg.logging_dir)))]
    dataset = MicroBatches(examples, schedule, pad_id, packed=cfg.packing == "packed")
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=_unwrap, callbacks=callbacks
    )
    if not sequential_arg:
        # Transformers before the `train_sampling_strategy` argument: the schedule is already ordered.
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(dataset)
    return trainer, schedule


def steps_per_epoch(micro_batches: int, accumulation: int) -> int:
    return max(1, math.ceil(micro_batches / accumulation))


def largest_micro_batch(
    examples: Sequence[Example], schedule: list[list[int]], packed: bool
) -> tuple[int, int]:
    """(tokens, rows) of the biggest micro-batch in a schedule."""
    tokens = rows = 0
    for b in schedule:
        if b:
            lengths = [len(examples[i].input_ids) for i in b]
            tokens = max(tokens, sum(lengths) if packed else len(b) * max(lengths))
            rows = max(rows, len(b))
    return tokens, rows


def padding_fraction(examples: Sequence[Example], schedule: list[list[int]], packed: bool = False) -> float:
    """Share of the trained positions that are padding (rows of a micro-batch padded to its longest)."""
    if packed:
        return 0.0
    real = padded = 0
    for b in schedule:
        if b:
            lengths = [len(examples[i].input_ids) for i in b]
            real += sum(lengths)
            padded += len(b) * max(lengths)
    return round(1 - real / padded, 4) if padded else 0.0


def latest_checkpoint(folder: Path) -> Path | None:
    clean_incomplete(folder)
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def train(
    model, examples: Sequence[Example], pad_id: int, cfg: TrainConfig, callbacks: list, stop_cb
) -> TrainOutcome:
    """Train to the end (or a stop), resuming from the job's last complete checkpoint.

    On CUDA out-of-memory: checkpoint the last finished optimizer step, split every micro-batch in
    two and double gradient accumulation, so each optimizer step still sees the same examples in
    the same order (same effective batch, same number of steps, same LR schedule), and go on from
    that step. When every micro-batch is already a single sequence, fail and say what was tried.
    """
    import time

    packed = cfg.packing == "packed"
    resume = latest_checkpoint(cfg.output_dir)
    resumed_from = int(resume.name.split("-")[-1]) if resume else None
    recoveries: list[dict] = []
    schedule = None
    t0 = time.monotonic()
    while True:
        trainer, schedule = build_trainer(model, examples, pad_id, cfg, callbacks, schedule)
        try:
            out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            break
        except torch.OutOfMemoryError as err:
            step = trainer.state.global_step
            tokens, rows = largest_micro_batch(examples, schedule, packed)
            recoveries.append(
                {
                    "event": "out_of_memory",
                    "step": step,
                    "micro_batch_tokens": tokens,
                    "max_rows": rows,
                    "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                }
            )
            log.warning("out of memory at step %d with micro-batches up to %d tokens: %s", step, tokens, err)
            model.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            done = Path(cfg.output_dir) / f"checkpoint-{step}" / COMPLETE_MARKER
            if step > 0 and not done.exists():
                try:  # keep every finished optimizer step: resume from exactly here
                    save_checkpoint_now(trainer)
                except Exception as save_err:
                    log.warning(
                        "could not checkpoint after OOM (%s); resuming from the last checkpoint", save_err
                    )
            del trainer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if rows <= 1:
                tried = ", ".join(
                    f"{r['micro_batch_tokens']} tokens x {r['max_rows']} rows" for r in recoveries
                )
                raise RuntimeError(
                    f"out of memory even with one sequence per micro-batch; tried {tried}. "
                    "Lower hyperparameters.max_seq_length or lora_r, or use a GPU with more memory."
                ) from None
            resume = latest_checkpoint(cfg.output_dir)
            schedule = split_schedule(schedule)
            cfg = replace(cfg, gradient_accumulation_steps=cfg.gradient_accumulation_steps * 2)
    state = trainer.state
    epoch = float(state.epoch or 0.0) * cfg.num_epochs  # the schedule is one Trainer epoch holding them all
    resumed_epoch = (resumed_from or 0) / max(1, state.max_steps) * cfg.num_epochs
    outcome = TrainOutcome(
        global_step=state.global_step,
        max_steps=state.max_steps,
        epoch=epoch,
        epochs_this_run=max(0.0, epoch - resumed_epoch),
        train_loss=_last_train_loss(trainer),
        train_seconds=round(time.monotonic() - t0, 2),
        resumed_from_step=resumed_from,
        recoveries=recoveries,
        micro_batch_tokens=largest_micro_batch(examples, schedule, packed)[0],
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        stopped_reason=stop_cb.reason,
        padding_fraction=padding_fraction(examples, schedule, packed=packed),
        log_history=list(state.log_history),
    )
    log.info(
        "training finished at step %d/%d (trainer said %s)",
        outcome.global_step,
        outcome.max_steps,
        out.metrics,
    )
    return outcome


def _last_train_loss(trainer) -> float | None:
    for rec in reversed(trainer.state.log_history):
        if "loss" in rec:
            return float(rec["loss"])
    return None


def save_checkpoint_now(trainer) -> None:
    """Checkpoint the current step outside the Trainer's schedule (after an OOM), marked complete."""
    trainer._save_checkpoint(trainer.model, trial=None)
    ckpt = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    (ckpt / COMPLETE_MARKER).write_text("{}")


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def eval_loss(
    model, examples: Sequence[Example], pad_id: int, *, token_budget: int, max_rows: int
) -> float | None:
    """Mean cross-entropy per trained (assistant) token over the examples; None without examples."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    plan = plan_micro_batches(
        [len(e.input_ids) for e in examples], token_budget=token_budget, max_rows=max_rows
    )
    device = next(p.device for p in model.parameters())
    for b in plan:
        batch = collate([examples[i] for i in b], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        out = model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device))
        total += float(out.loss) * n
        count += n
    if was_training:
        model.train()
    return total / count if count else None


def perplexity(loss: float | None) -> float | None:
    return round(math.exp(loss), 4) if loss is not None and loss < 50 else None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int) -> list[str]:
    """Greedy completions for chat prompts (one at a time: few prompts, and no padding effects)."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    outs = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {k: v.to(device) for k, v in ids.items()}
        gen = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        outs.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return outs
