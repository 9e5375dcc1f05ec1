"""Small Trainer callbacks: progress, checkpoints that survive a killed worker, and stopping.

Each does one thing and holds plain values, so the Trainer itself stays stock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)

COMPLETE_MARKER = "CHECKPOINT_COMPLETE"


# ----------------------------------------------------------------------------- checkpoints on disk


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints whose write finished (marker present), oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.glob("checkpoint-*"):
        if p.is_dir() and (p / COMPLETE_MARKER).exists():
            try:
                found.append((int(p.name.split("-")[-1]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def clean_incomplete(folder: Path) -> list[str]:
    """Remove checkpoint folders a killed worker left half-written; returns their names."""
    removed = []
    if folder.is_dir():
        for p in folder.glob("checkpoint-*"):
            if p.is_dir() and not (p / COMPLETE_MARKER).exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


class CheckpointCallback(TrainerCallback):
    """Save every N steps (Trainer's own save_steps) and also every `minutes`; mark complete; keep `keep`.

    The Trainer writes a checkpoint folder in place; only after every file is written does
    `on_save` run, and only then is the marker written (fsynced). A worker killed mid-write leaves
    a folder without the marker, which resume ignores and removes, so the previous one is used.
    """

    def __init__(self, folder: Path, *, minutes: float, keep: int = 2):
        self.folder, self.seconds, self.keep = folder, minutes * 60.0, keep
        self._last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self._last >= self.seconds:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        ckpt = self.folder / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            marker = ckpt / COMPLETE_MARKER
            with open(marker, "w") as f:
                json.dump({"step": state.global_step, "epoch": state.epoch, "time": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            for old in complete_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._last = time.monotonic()


# ----------------------------------------------------------------------------- stopping


class StopCallback(TrainerCallback):
    """Stop cleanly, with a checkpoint, on /cancel or before the time or cost limit is reached.

    Checked after every optimizer step, so a stop lands within one step. The limit check looks one
    step ahead (with a 1.5x margin on the last step's duration), so the final checkpoint is written
    before the limit rather than after it.
    """

    def __init__(
        self,
        cancel: threading.Event,
        *,
        max_seconds: float,
        max_cost_usd: float | None,
        hourly_usd: float,
        elapsed: Callable[[], float],
    ):
        self.cancel, self.max_seconds, self.max_cost = cancel, max_seconds, max_cost_usd
        self.hourly, self.elapsed = hourly_usd, elapsed
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
        elif self.max_cost is not None and next_end / 3600 * self.hourly >= self.max_cost:
            self.reason = f"cost limit: max_cost_usd={self.max_cost:g} would be passed by the next step"
        if self.reason:
            control.should_save = True
            control.should_training_stop = True


# ----------------------------------------------------------------------------- progress


def history_from_log(log_history: list[dict]) -> dict[str, list[dict]]:
    """Loss curves from the Trainer's log history (which checkpoints carry across a resume)."""
    train = [
        {
            "step": r["step"],
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
    """Turns Trainer logs into progress events: step, loss, LR, grad norm, eval loss, tokens, ETA.

    The Trainer runs one pass over a schedule that holds every epoch (see trainer.py), so its
    `state.epoch` in [0, 1] is scaled by the job's number of epochs.
    """

    def __init__(self, report: Callable[..., object], *, tokens_per_epoch: int, num_epochs: int):
        self.report, self.tokens_per_epoch, self.num_epochs = report, tokens_per_epoch, num_epochs
        self._t0: float | None = None
        self._start_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._start_step = time.monotonic(), state.global_step

    def record_eval(self, state, loss: float) -> None:
        # Into the Trainer's log history, so the eval curve is checkpointed with the train curve.
        state.log_history.append({"step": state.global_step, "eval_loss": float(loss)})
        self._send(state, force=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._send(state)

    def _send(self, state, force: bool = False) -> None:
        history = history_from_log(state.log_history)
        last = history["train"][-1] if history["train"] else {}
        metrics = {k: last.get(k) for k in ("loss", "learning_rate", "grad_norm")}
        if history["eval"]:
            metrics["eval_loss"] = history["eval"][-1]["eval_loss"]
        step = state.global_step
        done = step - self._start_step
        rate = (time.monotonic() - self._t0) / done if done > 0 and self._t0 else None
        eta = rate * (state.max_steps - step) if rate else None
        epoch = (state.epoch or 0.0) * self.num_epochs
        self.report(
            step=step,
            total_steps=state.max_steps,
            epoch=round(epoch, 4),
            metrics=metrics,
            tokens_seen=int(epoch * self.tokens_per_epoch),
            eta_seconds=round(eta, 1) if eta is not None else None,
            force=force,
        )


class InjectOOM:
    """Test hook (a forward pre-hook): raise CUDA's out-of-memory error above a token count.

    Lets the CPU suite exercise the OOM recovery path; never installed in a real job.
    """

    def __init__(self, above_tokens: int):
        self.above = above_tokens
        self.fired = 0

    def hook(self, module, args, kwargs):
        import torch

        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is not None and ids.numel() > self.above and module.training:
            self.fired += 1
            raise torch.OutOfMemoryError(f"injected OOM for {ids.numel()} tokens > {self.above}")


class EvalCallback(TrainerCallback):
    """Held-out loss every `every_steps` optimizer steps, computed exactly as before and after training."""

    def __init__(self, evaluate: Callable[[], float | None], every_steps: int, record: Callable[..., None]):
        self.evaluate, self.every, self.record = evaluate, every_steps, record

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            loss = self.evaluate()
            if loss is not None:
                self.record(state, loss)
