"""What rank 0 hands the other ranks once the job is planned and its model loaded.

Rank 0 alone fetches the dataset, tokenizes, plans, downloads and loads the model (and saves the
NF4 copy), measures the base, and checks the checkpoints (`find_resumable` moves corrupt ones
aside, so it runs once). Then it broadcasts one `Handoff`; the other ranks load the same weights
(from the NF4 copy rank 0 just verified) and train. A job that ends before training (a failure, a
cancel, a replayed result) hands off None and the other ranks exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from lora_worker.runtime.data.examples import Example
from lora_worker.runtime.model.resolve import ResolvedModel
from lora_worker.runtime.spec import JobSpec
from lora_worker.runtime.training.checkpoints import ResumePoint
from lora_worker.runtime.training.oom import Recovery
from lora_worker.runtime.training.ranks import Ranks
from lora_worker.runtime.training.trainer import TrainConfig


@dataclass(frozen=True)
class Handoff:
    weights: ResolvedModel
    spec: JobSpec
    train: list[Example]
    pad_id: int
    cfg: TrainConfig
    resume: ResumePoint  # rank 0's choice: every rank resumes from the same checkpoint


class Group:
    """This process's rank in the job's group, and the one message rank 0 sends before training."""

    def __init__(self, ranks: Ranks, recoveries: tuple[Recovery, ...] = ()):
        self.ranks, self.recoveries = ranks, recoveries
        self.handed_off = False

    def hand_off(self, handoff: Handoff | None) -> None:
        """Rank 0: send the other ranks what they train, once (None: nothing to train, they exit)."""
        if self.handed_off:
            return
        self.handed_off = True
        dist.broadcast_object_list([handoff], src=0, group=self.ranks.control)

    def receive(self) -> Handoff | None:
        """The other ranks: wait for rank 0's handoff (through fetch, download, load and baseline)."""
        box: list[Handoff | None] = [None]
        dist.broadcast_object_list(box, src=0, group=self.ranks.control)
        return box[0]
