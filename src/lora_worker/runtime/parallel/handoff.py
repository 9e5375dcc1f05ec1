"""What rank 0 hands the other ranks once the job is planned (and, data parallel, its model loaded).

Rank 0 alone fetches the dataset, tokenizes, plans, downloads the model and checks the checkpoints
(`find_resumable` moves corrupt ones aside, so it runs once). Data parallel, it also loads the model
(saving the NF4 copy) and measures the base, then broadcasts one `Handoff`; the other ranks load the
same weights (from the NF4 copy rank 0 just verified) and train. Sharded (FSDP), the handoff comes
before loading: every rank loads and shards the model at once, and the others then serve rank 0's
forwards (relay.py) until it announces training, and again after it, until the job ends. A job that
ends before the handoff (a failure, a cancel, a replayed result) hands off None and the other ranks exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from lora_worker.runtime.data.examples import Example
from lora_worker.runtime.model.resolve import ResolvedModel
from lora_worker.runtime.parallel.relay import Relay
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
    shard_over: int = 1  # > 1: FSDP-QLoRA across that many ranks; 1: data parallel


class Group:
    """This process's rank in the job's group, and what rank 0 tells the others: the handoff, and,
    sharded, its forwards and phases (`relay`)."""

    def __init__(self, ranks: Ranks, recoveries: tuple[Recovery, ...] = ()):
        self.ranks, self.recoveries = ranks, recoveries
        self.handed_off = False
        self.relay: Relay | None = None  # rank 0 of a sharded job, once handed off

    def hand_off(self, handoff: Handoff | None) -> None:
        """Rank 0: send the other ranks what they train, once (None: nothing to train, they exit)."""
        if self.handed_off:
            return
        self.handed_off = True
        dist.broadcast_object_list([handoff], src=0, group=self.ranks.control)
        if handoff is not None and handoff.shard_over > 1:
            self.relay = Relay(self.ranks)

    def announce_forwards(self, model) -> None:
        """Rank 0 of a sharded job: from now on the other ranks mirror `model`'s forwards (relay.py)."""
        if self.relay is not None:
            self.relay.attach(model)

    def gather(self, model) -> dict | None:
        """Rank 0 of a sharded job: the model's full state dict, gathered from every rank; else None."""
        return self.relay.gather(model) if self.relay is not None else None

    def start_training(self, handoff: Handoff) -> None:
        """Rank 0, about to train: data parallel the handoff, sharded the announcement."""
        if self.relay is None:
            self.hand_off(handoff)
        else:
            self.relay.start_training()

    def training_ended(self) -> None:
        if self.relay is not None:
            self.relay.training_ended()

    def close(self) -> None:
        """Rank 0, the job over: the other ranks exit (if they are still waiting for a word from it)."""
        self.hand_off(None)
        if self.relay is not None:
            self.relay.end()

    def receive(self) -> Handoff | None:
        """The other ranks: wait for rank 0's handoff (through fetch, download, load and baseline)."""
        box: list[Handoff | None] = [None]
        dist.broadcast_object_list(box, src=0, group=self.ranks.control)
        return box[0]
