"""The learning-rate schedule and the optimizer, built here and handed to the stock Trainer.

Transformers' cosine-with-warmup gives a learning rate of exactly 0 to the first optimizer step
whenever there is any warmup, and to every step when warmup covers the whole run (1 step with
warmup_ratio 0.03 rounds up to 1 warmup step): such a run trains nothing. Here warmup starts
above 0, never covers the whole run, and the cosine decay ends above 0 on the last step, so
every optimizer step moves the adapter.
"""

from __future__ import annotations

import math

import torch

FEW_STEPS = 10  # fewer optimizer steps than this: warmup and decay barely run; the plan warns


def steps_per_epoch(micro_batches: int, accumulation: int) -> int:
    """Optimizer steps over `micro_batches` with `accumulation` micro-batches per step (last one short)."""
    return max(1, math.ceil(micro_batches / accumulation))


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps: `warmup_ratio` of the run rounded up, always leaving at least one full-LR step."""
    if total_steps <= 1 or warmup_ratio <= 0:
        return 0
    return min(math.ceil(warmup_ratio * total_steps), total_steps - 1)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based); in (0, 1] for every
    step of the run.

    Warmup: (step + 1) / (warmup + 1), so the first step already learns. Then a half cosine over
    the remaining steps that would reach 0 one step after the last, so the last step keeps a
    small positive rate.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(step - warmup_steps, decay_steps - 1) / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over `lr_factor`; its state (the step count) is saved in and restored from every
    checkpoint by the Trainer, like its own schedulers'."""
    warmup = warmup_steps_for(total_steps, warmup_ratio)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model, args) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names (paged 8-bit AdamW, AdamW, ...), over the trainable parameters.

    Built once per training run and reused by every Trainer of that run (after an out-of-memory
    split too): bitsandbytes' paged optimizers keep their state in CUDA managed memory that is
    never given back while the optimizer lives, so one optimizer per run is what bounds it.
    """
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (no LoRA adapter was added)")
    return optimizer_cls([{"params": params, "weight_decay": args.weight_decay}], **kwargs)


def few_steps_warning(
    total_steps: int,
    *,
    micro_batches_per_epoch: int,
    gradient_accumulation_steps: int,
    num_epochs: int,
    threshold: int = FEW_STEPS,
) -> str | None:
    """A warning when the plan has fewer than `threshold` optimizer steps, saying how to get more."""
    if total_steps >= threshold:
        return None
    ways = []
    if gradient_accumulation_steps > 1:
        at_one = steps_per_epoch(micro_batches_per_epoch * num_epochs, 1)
        ways.append(f"hyperparameters.gradient_accumulation_steps 1 gives {at_one} steps")
    epochs_needed = math.ceil(threshold * gradient_accumulation_steps / max(1, micro_batches_per_epoch))
    if epochs_needed > num_epochs:
        ways.append(f"hyperparameters.num_epochs {epochs_needed} gives at least {threshold}")
    ways.append(
        "a smaller hyperparameters.batch_size or micro_batch_tokens makes more, smaller micro-batches"
    )
    return (
        f"only {total_steps} optimizer step{'s' * (total_steps != 1)} planned "
        f"({micro_batches_per_epoch} micro-batches per epoch x {num_epochs} epochs, "
        f"{gradient_accumulation_steps} per step): the learning-rate warmup and decay barely run and "
        f"the adapter may hardly change. For more steps: {'; '.join(ways)}."
    )
