"""Training on N processes (one per GPU) with the stock Trainer: the schedule each rank reads, and
the decisions every rank must take together.

The Trainer under `torchrun` (Accelerate's DDP, or a model sharded by parallel/fsdp.py) gives
rank r the dataset items r, r + N, r + 2N, ... (Accelerate's `BatchSamplerShard`, round-robin over
batches of one micro-batch). `shard_schedule` pads each optimizer step's micro-batches to a multiple
of N with empty micro-batches, so every step's micro-batches are split across the ranks and each
optimizer step trains exactly the examples it trains in one process; the loss is normalised over
the trained tokens of the whole step across ranks (the Trainer's `average_tokens_across_devices`:
`num_items_in_batch` is gathered from every rank and each rank's loss is scaled by N before DDP
averages the gradients). A checkpoint's step number alone still fixes the data position, on any N.

Stopping, saving and logging involve collectives (DDP's gradient all-reduce, the Trainer's gathered
loss, FSDP's state-dict gathering), so ranks that disagreed would hang: rank 0 decides (it holds
the cancel flag, the clocks of the time and cost limits, the held-out evaluation and the free-space
check) and `RankZeroDecides` broadcasts its decision after every step and every log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from lora_worker.runtime.training.oom import Recovery


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job's process group."""

    rank: int
    world: int
    control: Any = None  # a gloo process group for CPU-side agreements (None: the default group)

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.control)


class GroupOutOfMemory(RuntimeError):
    """A rank ran out of memory: the group stops as one and is relaunched from the last checkpoint with
    every micro-batch split in two and gradient accumulation doubled (`recoveries` lists every split
    so far, this one last). An out-of-memory error inside DDP's backward leaves the other ranks
    waiting in its gradient all-reduce, where the stock Trainer gives no point to agree on a retry."""

    def __init__(self, recoveries: tuple[Recovery, ...], rank: int):
        self.recoveries, self.rank = recoveries, rank
        last = recoveries[-1]
        super().__init__(f"rank {rank} ran out of memory at step {last.step}: {last.message}")


def per_rank_accumulation(accumulation: int, world: int) -> int:
    """Micro-batches each rank trains per optimizer step (the step's micro-batches split across ranks)."""
    return math.ceil(accumulation / world)


def padding_per_step(accumulation: int, world: int) -> int:
    """Empty micro-batches added to a full optimizer step so that it splits evenly across ranks."""
    return per_rank_accumulation(accumulation, world) * world - accumulation


def shard_schedule(schedule: list[list[int]], accumulation: int, world: int) -> tuple[list[list[int]], int]:
    """(the schedule as the Trainer reads it on `world` ranks, per-rank accumulation).

    Each optimizer step's `accumulation` consecutive micro-batches (the last step's may be fewer) are
    padded with empty micro-batches to a multiple of `world`; read round-robin, rank r trains the
    step's micro-batches r, r + world, ... With one rank this is the schedule itself.
    """
    if world == 1:
        return schedule, accumulation
    out: list[list[int]] = []
    for start in range(0, len(schedule), accumulation):
        step = schedule[start : start + accumulation]
        out += step + [[] for _ in range(math.ceil(len(step) / world) * world - len(step))]
    return out, per_rank_accumulation(accumulation, world)


class RankZeroDecides(TrainerCallback):
    """Every rank stops, saves and logs exactly when rank 0 does (installed after every callback that
    may change those decisions). One broadcast of three flags per optimizer step and per log."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def on_step_end(self, args, state, control, **kwargs):
        self._agree(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._agree(control)

    def _agree(self, control) -> None:
        flags = torch.tensor(
            [control.should_training_stop, control.should_save, control.should_log], dtype=torch.int32
        )
        dist.broadcast(flags, src=0, group=self.ranks.control)
        control.should_training_stop, control.should_save, control.should_log = (
            bool(f) for f in flags.tolist()
        )
