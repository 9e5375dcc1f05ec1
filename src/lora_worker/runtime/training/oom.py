"""Out-of-memory recovery for training: what is kept, what is released, and how the plan shrinks.

A step that runs out of accelerator memory leaves its activations referenced by the exception's
traceback (every frame of the forward and backward pass). So an attempt's `except` block keeps
only the message and returns; once it has returned, the traceback and those frames are gone, and
the caller drops the failed Trainer, collects (`gc.collect()` breaks the reference cycles that
frames and the Trainer form) and empties the CUDA cache before the retry is built.

What carries over to the retry, in memory: the model (the adapter as of the last finished
optimizer step: an out-of-memory error in the forward or backward pass happens before the
optimizer touches it), the one optimizer of the run (its state, paged on CUDA, is reused, never
re-allocated), the one LR scheduler and the Trainer's state (step, log history), written as a
small recovery point the next Trainer resumes from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from lora_worker.runtime.device import out_of_memory_message

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"  # the name Trainer.train(resume_from_checkpoint=...) reads


class TrainingOutOfMemory(RuntimeError):
    """Out of memory with nothing left to shrink (or in the optimizer step itself)."""


@dataclass(frozen=True)
class Recovery:
    """One out-of-memory error that training recovered from (or gave up on)."""

    step: int  # last finished optimizer step when it happened
    micro_batch_tokens: int  # largest micro-batch of the plan that failed (rows x padded length)
    max_rows: int
    gradient_accumulation_steps: int  # of the plan that failed; the retry doubles it
    message: str  # the error's first line
    event: str = "out_of_memory"


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


def largest_micro_batch(examples: Sequence, schedule: list[list[int]], packed: bool) -> tuple[int, int]:
    """(tokens, rows) of the biggest micro-batch in a schedule."""
    tokens = rows = 0
    for b in schedule:
        if b:
            lengths = [len(examples[i].input_ids) for i in b]
            tokens = max(tokens, sum(lengths) if packed else len(b) * max(lengths))
            rows = max(rows, len(b))
    return tokens, rows


def run_attempt(trainer, resume: str | None) -> str | None:
    """Train to the end or a stop; None then, or the message of an out-of-memory error.

    Any other error propagates. Only a string leaves the `except` block, so when this returns
    nothing of the failed step (activations, inputs, the traceback) is referenced any more.
    """
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as err:
        message = out_of_memory_message(err)
        if message is None:
            raise
        return message
    return None


class StepPhase(TrainerCallback):
    """Knows whether the Trainer is inside an optimizer update (from the optimizer step until the
    step is counted): an error there may have left the adapter half-updated."""

    def __init__(self) -> None:
        self.in_update = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.in_update = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.in_update = True

    def on_step_end(self, args, state, control, **kwargs):
        self.in_update = False


def save_recovery_point(state, model, folder: Path) -> Path:
    """The Trainer state and the adapter as they are in memory, for the next Trainer to resume from.

    No optimizer or scheduler file: the Trainer then leaves the (reused) optimizer and scheduler
    as they are, which is exactly their state at this step.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    state.save_to_json(str(folder / TRAINER_STATE_FILE))
    return folder


def give_up_message(recoveries: list[Recovery]) -> str:
    tried = ", ".join(f"{r.micro_batch_tokens} tokens x {r.max_rows} rows" for r in recoveries)
    return (
        f"out of memory even with one sequence per micro-batch; tried {tried}. "
        "Lower hyperparameters.max_seq_length or lora_r, turn on training.activation_offload, "
        "or use a GPU with more memory."
    )


def torn_update_message(step: int, message: str) -> str:
    return (
        f"out of memory inside the optimizer update of step {step + 1} ({message}): smaller "
        "micro-batches do not shrink the optimizer's memory. Lower hyperparameters.lora_r, use "
        "training.optimizer paged_adamw_8bit, or use a GPU with more memory."
    )
