"""Training on the stock Transformers Trainer, fed whole micro-batches, with OOM recovery.

The Trainer sees a dataset whose items are ready micro-batches, in the order they will be
trained: every epoch's micro-batches (planned within a token budget) shuffled with the job's seed,
one epoch after another, read sequentially. So `per_device_train_batch_size` is 1, the collator
unwraps, and a checkpoint's step number alone fixes the data position. Loss is averaged over the
trained tokens of all micro-batches in an optimizer step (the Trainer passes `num_items_in_batch`),
so long and short examples weigh per token.

The optimizer and the learning-rate schedule are built here (schedule.py) and passed to the
Trainer: one of each per run, reused by every Trainer of the run.

Under `torchrun` (N processes, one per GPU: ranks.py) the same schedule is split across the ranks
so that every optimizer step trains the same examples as in one process; rank 0 writes the
checkpoints, the TensorBoard files and every decision to stop or save.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from lora_worker.runtime.data.batches import collate, collate_packed, plan_micro_batches, plan_packed
from lora_worker.runtime.device import free_accelerator_memory
from lora_worker.runtime.parallel import fsdp
from lora_worker.runtime.parallel.relay import AnnounceStepEnd, ServeStepEnd
from lora_worker.runtime.training.callbacks import JobEpochs, NonFiniteGuard
from lora_worker.runtime.training.checkpoints import (
    CheckpointCallback,
    ResumePoint,
    clean_incomplete,
    find_resumable,
)
from lora_worker.runtime.training.offload import install_activation_offload
from lora_worker.runtime.training.oom import (
    Recovery,
    StepPhase,
    TrainingOutOfMemory,
    give_up_message,
    largest_micro_batch,
    run_attempt,
    save_recovery_point,
    split_schedule,
    torn_update_message,
)
from lora_worker.runtime.training.ranks import GroupOutOfMemory, Ranks, RankZeroDecides, shard_schedule
from lora_worker.runtime.training.schedule import build_optimizer, build_scheduler, steps_per_epoch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Plain values the trainer needs (from the job spec's hyperparameters and training options)."""

    output_dir: Path  # the job's checkpoints folder
    logging_dir: Path  # TensorBoard event files
    num_epochs: int
    learning_rate: float  # peak
    warmup_ratio: float
    gradient_accumulation_steps: int
    micro_batch_tokens: int  # token budget of one micro-batch (rows x padded length)
    max_rows: int
    seed: int
    optimizer: str  # "auto" or a TrainingArguments.optim name
    checkpoint_steps: int
    logging_steps: int
    gradient_checkpointing: bool  # applied when the model is prepared; here for the record
    packing: str = "rows"  # "rows": one example per right-padded row; "packed": one row, block mask
    report_to: tuple[str, ...] = ("tensorboard",)  # and/or "wandb"
    checkpoint_minutes: float = 30.0  # also save at least this often
    keep_checkpoints: int = 2  # complete checkpoints kept while training
    activation_offload: bool = False  # saved activations of the decoder in (pinned) CPU memory
    max_grad_norm: float = 0.3


# How long a rank waits in a collective of the training loop (seconds) before it fails: longer than a
# held-out evaluation that rank 0 runs while the others wait. A rank that dies is noticed by
# torchrun's agent at once, not by this timeout.
COLLECTIVE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class TrainOutcome:
    global_step: int
    max_steps: int
    epoch: float  # job epochs trained, all attempts (2.0 = two passes over the training set)
    train_loss: float | None  # last logged training loss
    train_seconds: float
    resumed_from_step: int | None
    resume_reason: str  # which checkpoint was used, or why training started from step 0
    optimizer: str  # what `auto` became: "paged_adamw_8bit", "adamw_torch", ...
    recoveries: tuple[Recovery, ...] = ()
    micro_batch_tokens: int = 0  # largest micro-batch trained (after any OOM split)
    gradient_accumulation_steps: int = 0  # as trained (doubled by each OOM split)
    stopped_reason: str | None = None  # None: trained to the end
    padding_fraction: float = 0.0
    epochs_this_run: float = 0.0  # epochs trained by this process (less than `epoch` after a resume)
    adapter_update_norm: float = 0.0  # see adapter_update_norm(); 0.0: the adapter is still the identity
    log_history: list[dict] = field(default_factory=list)  # the Trainer's, carried across resumes
    warnings: tuple[str, ...] = ()  # e.g. corrupt checkpoints moved aside


class MicroBatches(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence, schedule: list[list[int]], pad_id: int, packed: bool = False):
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
    out: list[list[int]] = []
    for epoch in range(epochs):
        order = list(range(len(plan)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out += [plan[i] for i in order]
    return out


def plan_batches(examples: Sequence, cfg: TrainConfig) -> list[list[int]]:
    lengths = [len(e.input_ids) for e in examples]
    if cfg.packing == "packed":
        return plan_packed(lengths, token_budget=cfg.micro_batch_tokens)
    return plan_micro_batches(lengths, token_budget=cfg.micro_batch_tokens, max_rows=cfg.max_rows)


def padding_fraction(examples: Sequence, schedule: list[list[int]], packed: bool = False) -> float:
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


def resolve_optimizer(name: str, device: str, sharded: bool = False) -> str:
    if name != "auto":
        return name
    # 8-bit paged AdamW needs bitsandbytes' CUDA kernels; on the CPU plain AdamW. Sharded (FSDP)
    # LoRA weights are DTensors, which bitsandbytes' optimizers cannot step: plain AdamW, whose
    # state is sharded with them.
    return "paged_adamw_8bit" if device == "cuda" and not sharded else "adamw_torch"


def adapter_update_norm(model) -> float:
    """L2 norm of every LoRA B matrix: 0.0 means the adapter is still the identity.

    PEFT initialises B to zero (A is random), so the adapter's change to any output is B @ A x;
    a norm of 0.0 after training means no optimizer step moved it and the saved adapter would
    change no logit.
    """
    # collective when the model is sharded: every rank calls it, for the same parameters
    return sum(fsdp.full_norm_squared(p) for n, p in model.named_parameters() if "lora_B" in n) ** 0.5


def training_arguments(cfg: TrainConfig, device: str, sharded: bool = False) -> TrainingArguments:
    """The Trainer's arguments; under torchrun the Trainer (Accelerate) adds DDP by itself, except to a
    `sharded` (FSDP) model, whose checkpoints FsdpSaver writes (the Trainer would save no optimizer)."""
    sequential = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}
    return TrainingArguments(
        output_dir=str(cfg.output_dir),
        num_train_epochs=1,  # one pass over the schedule, which holds every epoch
        per_device_train_batch_size=1,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        max_grad_norm=cfg.max_grad_norm,
        weight_decay=0.0,
        optim=resolve_optimizer(cfg.optimizer, device, sharded),
        bf16=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must be seen (NonFiniteGuard), not averaged away
        save_strategy="steps",
        save_steps=cfg.checkpoint_steps,
        save_total_limit=None,  # rotation is CheckpointCallback's, which keeps the last complete ones
        eval_strategy="no",  # held-out loss is computed by EvalCallback, the same way before and after
        report_to="none",  # integrations are added as callbacks, after JobEpochs (train())
        # activation checkpointing is already enabled (non-reentrant) on the model when LoRA is added
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        disable_tqdm=True,
        save_only_model=sharded,
        # one optimizer step's loss is averaged over its trained tokens on every rank (see ranks.py)
        average_tokens_across_devices=True,
        ddp_timeout=COLLECTIVE_TIMEOUT_S,
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward
        ddp_broadcast_buffers=False,  # the model's buffers (rotary frequencies) are constants
        **({"train_sampling_strategy": "sequential"} if sequential else {}),
    )


def build_trainer(
    model,
    examples: Sequence,
    pad_id: int,
    cfg: TrainConfig,
    callbacks: list,
    schedule: list[list[int]] | None = None,
    optimizers: tuple | None = None,
    world: int = 1,
):
    """A stock Trainer over the job's micro-batch schedule; returns (trainer, schedule).

    `optimizers` is the run's (optimizer, scheduler); built here when not given. The Trainer's
    printer callback is removed: the worker's progress events say what it would print. With
    `world` ranks, the Trainer reads the schedule split across them (`shard_schedule`), with the
    per-rank accumulation; the schedule returned is the job's own.
    """
    if schedule is None:
        schedule = make_schedule(plan_batches(examples, cfg), cfg.num_epochs, cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    split, per_rank = shard_schedule(schedule, cfg.gradient_accumulation_steps, world)
    args = training_arguments(
        replace(cfg, gradient_accumulation_steps=per_rank), device, fsdp.is_sharded(model)
    )
    if optimizers is None:
        optimizer = build_optimizer(model, args)
        total = steps_per_epoch(len(schedule), cfg.gradient_accumulation_steps)
        optimizers = (optimizer, build_scheduler(optimizer, total_steps=total, warmup_ratio=cfg.warmup_ratio))
    dataset = MicroBatches(examples, split, pad_id, packed=cfg.packing == "packed")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=_unwrap,
        callbacks=callbacks,
        optimizers=optimizers,
    )
    trainer.remove_callback(PrinterCallback)
    if not hasattr(args, "train_sampling_strategy"):
        # Transformers before the `train_sampling_strategy` argument: the schedule is already ordered.
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(dataset)
    return trainer, schedule


def _unwrap(items: list[dict]) -> dict:
    return items[0]


def reporting_callbacks(cfg: TrainConfig) -> list[TrainerCallback]:
    """TensorBoard (to `logging_dir`, not under the checkpoints) and/or Weights & Biases."""
    out: list[TrainerCallback] = []
    if "tensorboard" in cfg.report_to:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        out.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(cfg.logging_dir))))
    if "wandb" in cfg.report_to:
        from transformers.integrations import WandbCallback

        out.append(WandbCallback())
    return out


def train(
    model,
    examples: Sequence,
    pad_id: int,
    cfg: TrainConfig,
    callbacks: list,
    *,
    resume: ResumePoint | None = None,
    ranks: Ranks | None = None,
    recoveries: Sequence[Recovery] = (),
) -> TrainOutcome:
    """Train to the end (or a stop), resuming from the newest verified checkpoint in `cfg.output_dir`
    (`resume`: the caller's own `find_resumable(cfg.output_dir)`, to verify the checksums once).

    `ranks`: this process's place in a torchrun group (every rank calls train() with the same
    arguments and the same `resume`; rank 0 alone passes the job's callbacks). `recoveries`: the
    out-of-memory splits of earlier launches of the group, applied before the first step.

    `callbacks` are the caller's (progress, held-out eval, stop); checkpoints (every
    `checkpoint_steps` and `checkpoint_minutes`, with a free-space check), the non-finite guard
    and the job-epoch log records are installed here. A callback's `reason` becomes the
    outcome's `stopped_reason`.

    On out-of-memory: the failed step is released, every micro-batch is split in two and gradient
    accumulation doubled, so each optimizer step still sees the same examples in the same order
    (same effective batch, same steps, same LR schedule), and training goes on from the last
    finished step with the same optimizer. When every micro-batch is already one sequence, it
    fails (TrainingOutOfMemory) saying what was tried. In a group the ranks cannot agree on a retry
    (see GroupOutOfMemory): the rank raises GroupOutOfMemory and the group is relaunched.
    """
    if any(isinstance(cb, CheckpointCallback) for cb in callbacks):
        raise ValueError("train() installs the CheckpointCallback itself; do not pass one")
    t0 = time.monotonic()
    world = ranks.world if ranks else 1
    resume = resume or find_resumable(cfg.output_dir)
    if ranks is None or ranks.is_zero:
        clean_incomplete(cfg.output_dir)
        log.info("%s", resume.reason)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sharded = fsdp.is_sharded(model)
    schedule, run_cfg = make_schedule(plan_batches(examples, cfg), cfg.num_epochs, cfg.seed), cfg
    for _ in recoveries:  # an earlier launch's splits: same steps, smaller micro-batches
        schedule = split_schedule(schedule)
        run_cfg = replace(run_cfg, gradient_accumulation_steps=run_cfg.gradient_accumulation_steps * 2)
    optimizer = build_optimizer(model, training_arguments(cfg, device, sharded))
    total = steps_per_epoch(len(schedule), run_cfg.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_ratio=cfg.warmup_ratio)
    phase = StepPhase()
    all_callbacks = _with_installed(callbacks, phase, cfg, ranks, sharded)
    offload = install_activation_offload(model) if cfg.activation_offload else None
    recoveries = list(recoveries)
    start = str(resume.checkpoint) if resume.checkpoint else None
    try:
        with tempfile.TemporaryDirectory(prefix="lora-oom-recovery-") as scratch:
            if sharded and start:  # the optimizer into this rank's shards; the Trainer loads the rest
                start = fsdp.load_resume_state(
                    model, optimizer, scheduler, Path(start), Path(scratch) / "resume"
                )
            while True:
                trainer, _ = build_trainer(
                    model, examples, pad_id, run_cfg, all_callbacks, schedule, (optimizer, scheduler), world
                )
                message = run_attempt(trainer, start)
                # The optimizer as the first Trainer prepared it (Accelerate's wrapper): a prepared
                # optimizer is not prepared again, so its state (paged on CUDA) stays where it is
                # instead of being copied to the device by every new Trainer.
                optimizer = trainer.optimizer
                if message is None:
                    break
                # Outside the except block: the failed step's activations are already unreferenced.
                step = trainer.state.global_step
                tokens, rows = largest_micro_batch(examples, schedule, cfg.packing == "packed")
                ga = run_cfg.gradient_accumulation_steps
                recoveries.append(Recovery(step, tokens, rows, ga, message))
                log.warning(
                    "out of memory at step %d with micro-batches up to %d tokens: %s", step, tokens, message
                )
                if phase.in_update:
                    raise TrainingOutOfMemory(torn_update_message(step, message))
                if rows <= 1:
                    raise TrainingOutOfMemory(give_up_message(recoveries))
                if ranks is not None:
                    raise GroupOutOfMemory(tuple(recoveries), ranks.rank)
                model.zero_grad(set_to_none=True)
                start = _recovery_point(trainer, model, Path(scratch) / f"step-{step}", cfg.output_dir, start)
                del trainer
                free_accelerator_memory()
                schedule = split_schedule(schedule)
                run_cfg = replace(run_cfg, gradient_accumulation_steps=ga * 2)
            return _outcome(trainer, examples, run_cfg, schedule, resume, recoveries, all_callbacks, t0)
    finally:
        if offload is not None:
            offload.remove()


def _with_installed(
    callbacks: list, phase: StepPhase, cfg: TrainConfig, ranks: Ranks | None, sharded: bool = False
) -> list:
    """The caller's callbacks among those train() installs. Order matters: StepPhase first (it must
    see every step end), the saver after every callback that may ask for a save, the guard last so
    nothing re-enables a save after a NaN, then rank 0's decisions broadcast to the other ranks, and
    the reporting integrations (rank 0 only) after JobEpochs has rewritten the epochs.

    Sharded (FSDP) across `ranks`: the other ranks serve rank 0's forwards where its callbacks run
    (relay.py), and the agreed saves are written by FsdpSaver, after the agreement."""
    saver = CheckpointCallback(
        cfg.output_dir, minutes=cfg.checkpoint_minutes, keep=cfg.keep_checkpoints, ranks=ranks
    )
    agree = [RankZeroDecides(ranks)] if ranks else []
    reports = reporting_callbacks(cfg) if ranks is None or ranks.is_zero else []
    relay, sharded_saves = [], []
    if sharded and ranks is not None:
        relay = [AnnounceStepEnd(ranks) if ranks.is_zero else ServeStepEnd(ranks)]
        sharded_saves = [FsdpSaver(saver)]
    tail = [saver, NonFiniteGuard(), *agree, *sharded_saves, *reports]
    return [phase, JobEpochs(cfg.num_epochs), *callbacks, *relay, *tail]


class FsdpSaver(TrainerCallback):
    """Writes the agreed checkpoint of a sharded model itself (fsdp.save_checkpoint, every rank), then
    completes it as CheckpointCallback does, and tells the Trainer it is saved. A save asked for at a
    step that logs is written after the log, where the Trainer would write it."""

    def __init__(self, saver: CheckpointCallback):
        self.saver = saver

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save and not control.should_log:
            self._save(args, state, control, **kwargs)

    def on_log(self, args, state, control, **kwargs):
        if control.should_save:
            self._save(args, state, control, **kwargs)

    def _save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds ours
        fsdp.save_checkpoint(model, inner, lr_scheduler, state, self.saver.folder)
        self.saver.on_save(args, state, control)
        control.should_save = False


def _recovery_point(trainer, model, folder: Path, checkpoints: Path, start: str | None) -> str | None:
    """Where the retry starts: the state in memory at the last finished step, or, when that cannot
    be written, the newest verified checkpoint (optimizer state included); at step 0 (nothing
    trained, or the resume itself failed) where the failed attempt started."""
    step = trainer.state.global_step
    if step == 0:
        return start
    try:
        return str(save_recovery_point(trainer.state, model, folder))
    except OSError as err:
        fallback = find_resumable(checkpoints)
        if fallback.checkpoint is None:
            raise TrainingOutOfMemory(
                f"out of memory at step {step}, and the state to retry from could not be written ({err})"
            ) from err
        log.warning("could not write the recovery point (%s); %s", err, fallback.reason)
        return str(fallback.checkpoint)


def _outcome(trainer, examples, cfg, schedule, resume, recoveries, callbacks, t0) -> TrainOutcome:
    state = trainer.state
    packed = cfg.packing == "packed"
    epoch = float(state.epoch or 0.0) * cfg.num_epochs  # the schedule is one Trainer epoch holding them all
    resumed_epoch = (resume.step or 0) / max(1, state.max_steps) * cfg.num_epochs
    reason = next((cb.reason for cb in callbacks if getattr(cb, "reason", None)), None)
    outcome = TrainOutcome(
        global_step=state.global_step,
        max_steps=state.max_steps,
        epoch=round(epoch, 4),
        epochs_this_run=round(max(0.0, epoch - resumed_epoch), 4),
        train_loss=_last_train_loss(state.log_history),
        train_seconds=round(time.monotonic() - t0, 2),
        resumed_from_step=resume.step,
        resume_reason=resume.reason,
        optimizer=str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        recoveries=tuple(recoveries),
        micro_batch_tokens=largest_micro_batch(examples, schedule, packed)[0],
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        stopped_reason=reason,
        padding_fraction=padding_fraction(examples, schedule, packed=packed),
        adapter_update_norm=adapter_update_norm(trainer.model),
        log_history=list(state.log_history),
        warnings=resume.warnings,
    )
    log.info("training finished at step %d/%d", outcome.global_step, outcome.max_steps)
    return outcome


def _last_train_loss(log_history: list[dict]) -> float | None:
    for rec in reversed(log_history):
        if "loss" in rec:
            return float(rec["loss"])
    return None
