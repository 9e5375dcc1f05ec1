"""Small Trainer callbacks: progress, held-out evaluation, stopping, and guards on the numbers.

Each does one thing and holds plain values, so the Trainer itself stays stock. A callback that
stops training says why in its `reason` (train() reports the first one set).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from lora_worker.runtime.evaluation.loss import NonFiniteLoss

# ----------------------------------------------------------------------------- stopping


class StopCallback(TrainerCallback):
    """Stop cleanly, with a checkpoint, on /cancel or before the time or cost limit is reached.

    Checked after every optimizer step, so a stop lands within one step. The limit check looks one
    step ahead (with a 1.5x margin on the last step's duration), so the final checkpoint is written
    before the limit rather than after it. `elapsed()` is this attempt's seconds (the time limit is
    per attempt); `prior_cost_usd` is what earlier attempts of the job spent (the cost limit is the
    job's budget).
    """

    def __init__(
        self,
        cancel: threading.Event,
        *,
        max_seconds: float,
        max_cost_usd: float | None,
        hourly_usd: float,
        elapsed: Callable[[], float],
        prior_cost_usd: float = 0.0,
    ):
        self.cancel, self.max_seconds, self.max_cost = cancel, max_seconds, max_cost_usd
        self.hourly, self.elapsed, self.prior_cost = hourly_usd, elapsed, prior_cost_usd
        self.reason: str | None = None
        self._step_started = time.monotonic()
        self._last_step_s = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        self._last_step_s = time.monotonic() - self._step_started
        next_end = self.elapsed() + 1.5 * self._last_step_s
        if state.global_step >= state.max_steps:
            return  # the job is done: a limit or cancel now has nothing left to stop
        if self.cancel.is_set():
            self.reason = "cancelled"
        elif next_end >= self.max_seconds:
            self.reason = (
                f"time limit: max_duration_hours={self.max_seconds / 3600:g} would be passed by the next step"
            )
        elif self.max_cost is not None and self.prior_cost + next_end / 3600 * self.hourly >= self.max_cost:
            self.reason = f"cost limit: max_cost_usd={self.max_cost:g} would be passed by the next step"
        if self.reason:
            control.should_save = True
            control.should_training_stop = True


class NonFiniteGuard(TrainerCallback):
    """Stop at the first NaN or infinite loss or gradient, before it reaches the adapter or a checkpoint.

    Before each optimizer step the trainable gradients are checked (one reduction per tensor, one
    device sync per step); non-finite ones are dropped, so the optimizer leaves the adapter as it
    was, and training stops without saving. The logged `loss` and `grad_norm` are checked too.
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            for p in model.parameters():
                p.grad = None  # optimizers skip parameters without a gradient
            self._stop(
                control, f"non-finite loss at step {state.global_step + 1} (NaN or infinite gradients)"
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.reason:
            self._stop(control, self.reason)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value) and not self.reason:
                self.reason = f"non-finite loss at step {state.global_step} ({key} {value})"
        if self.reason:
            self._stop(control, self.reason)

    def _stop(self, control, reason: str) -> None:
        self.reason = self.reason or reason
        control.should_save = False  # a checkpoint now would hold (or lead to) NaN weights
        control.should_training_stop = True


class JobEpochs(TrainerCallback):
    """Log records carry the job's epochs, not the Trainer's.

    The Trainer runs one pass over a schedule that holds every epoch (see trainer.py), so its own
    `epoch` runs 0 -> 1 over the whole job; records logged from here on (and the copies integration
    callbacks such as TensorBoard receive, when they come after this one) say job epochs instead.
    """

    def __init__(self, num_epochs: int):
        self.num_epochs = num_epochs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.epoch is None:
            return
        epoch = round(state.epoch * self.num_epochs, 4)
        if logs is not None and "epoch" in logs:
            logs["epoch"] = epoch
        if state.log_history and "epoch" in state.log_history[-1]:
            state.log_history[-1]["epoch"] = epoch


# ----------------------------------------------------------------------------- progress


def history_from_log(log_history: list[dict]) -> dict[str, list[dict]]:
    """Loss curves from the Trainer's log history (which checkpoints carry across a resume)."""
    train = [
        {
            "step": r["step"],
            "epoch": r.get("epoch"),
            "loss": float(r["loss"]),
            "learning_rate": float(r.get("learning_rate", 0.0)),
            "grad_norm": float(r["grad_norm"]) if r.get("grad_norm") is not None else None,
        }
        for r in log_history
        if "loss" in r and "step" in r
    ]
    evals = [{"step": r["step"], "eval_loss": float(r["eval_loss"])} for r in log_history if "eval_loss" in r]
    return {"train": train, "eval": evals}


class ProgressCallback(TrainerCallback):
    """Turns the Trainer's log records into progress events: step, loss, LR, grad norm, epoch, ETA.

    `reporter` is the job's events.Reporter. Metrics go out only with the log record of their own
    step (one history row per step on the dashboard); a held-out loss recorded during a step
    (`record_eval`, which runs before the Trainer logs that step) is sent by the reporter together
    with that step's record. Epochs are the job's (JobEpochs rewrites the Trainer's 0 -> 1 count).
    """

    def __init__(self, reporter, *, tokens_per_epoch: int, num_epochs: int):
        self.reporter, self.tokens_per_epoch, self.num_epochs = reporter, tokens_per_epoch, num_epochs
        self._t0: float | None = None
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._start_step = time.monotonic(), state.global_step

    def record_eval(self, state, loss: float) -> None:
        # Into the Trainer's log history too, so the eval curve is checkpointed with the train curve.
        state.log_history.append({"step": state.global_step, "eval_loss": float(loss)})
        self.reporter.evaluation(step=state.global_step, eval_loss=loss)

    def on_log(self, args, state, control, logs=None, **kwargs):
        history = history_from_log(state.log_history)
        last = history["train"][-1] if history["train"] else None
        record = (
            {k: last[k] for k in ("loss", "learning_rate", "grad_norm", "epoch")}
            if last and last["step"] == state.global_step
            else None
        )
        step = state.global_step
        done = step - self._start_step
        rate = (time.monotonic() - self._t0) / done if done > 0 and self._t0 else None
        epoch = (state.epoch or 0.0) * self.num_epochs
        self.reporter.progress(
            step=step,
            total_steps=state.max_steps,
            metrics=record,
            tokens_seen=int(epoch * self.tokens_per_epoch),
            eta_seconds=round(rate * (state.max_steps - step), 1) if rate else None,
        )


class EvalCallback(TrainerCallback):
    """Held-out loss every `every_steps` optimizer steps, computed exactly as before and after training.

    Runs at the end of the step, before the Trainer logs it (and asks for that log), so the
    progress event of an evaluation step carries that step's training metrics and its held-out
    loss together, and a checkpoint saved at that step holds both. A non-finite held-out loss
    stops training (`reason`) without a checkpoint.
    """

    def __init__(self, evaluate: Callable[[], float | None], every_steps: int, record: Callable[..., None]):
        self.evaluate, self.every, self.record = evaluate, every_steps, record
        self.reason: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return
        try:
            loss = self.evaluate()
        except NonFiniteLoss as err:
            self.reason = f"non-finite held-out loss at step {state.global_step}: {err}"
            control.should_save = False
            control.should_training_stop = True
            return
        if loss is not None:
            self.record(state, loss)
            control.should_log = True
