"""Rank 0's forwards outside training, mirrored by the other ranks of a sharded (FSDP) job.

Under FSDP every forward all-gathers each layer's weights from every rank, so a forward that rank 0
runs alone (the held-out loss before, during and after training, the scenario replies, the judge)
would wait forever for the others. Rank 0 tells the story as in one process; a forward pre-hook on
its model announces every forward run without gradients, and the other ranks, serving, answer each
with a forward of one token: the same layers, so the same all-gathers (their sizes are the weights',
whatever the input), and nothing computed that matters. Training forwards (with gradients) are not
announced: every rank runs those itself. Gathering the full state dict to rank 0 is announced too.

The announcements go over the gloo control group (ranks.py), one small pickled message each:
`forward`, `gather`, `train` (the others start training beside rank 0), `continue` (sent after rank
0's step-end callbacks, so the others serve rank 0's evaluations between steps), `end`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from lora_worker.runtime.parallel.fsdp import gather_state_dict
from lora_worker.runtime.training.ranks import Ranks

FORWARD, GATHER, TRAIN, CONTINUE, END = "forward", "gather", "train", "continue", "end"


def send(ranks: Ranks, op: str) -> None:
    dist.broadcast_object_list([op], src=0, group=ranks.control)


def receive(ranks: Ranks) -> str:
    box: list[str | None] = [None]
    dist.broadcast_object_list(box, src=0, group=ranks.control)
    return str(box[0])


class Relay:
    """Rank 0's side: announces its forwards without gradients, gathers, and the group's phases."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.serving = True  # the other ranks wait for announcements (not training, not ended)
        self._hook = None

    def attach(self, model) -> None:
        """Announce every forward of `model` run without gradients."""
        # prepended: FSDP's own pre-forward hook, registered by fully_shard, all-gathers the root's
        # weights, which the other ranks only join once they know a forward is coming
        self._hook = model.get_base_model().register_forward_pre_hook(self._announce, prepend=True)

    def _announce(self, module, args) -> None:
        if not torch.is_grad_enabled():
            send(self.ranks, FORWARD)

    def gather(self, model) -> dict[str, torch.Tensor]:
        send(self.ranks, GATHER)
        return gather_state_dict(model)

    def start_training(self) -> None:
        send(self.ranks, TRAIN)
        self.serving = False

    def training_ended(self) -> None:
        """Training returned on rank 0, so on every rank: the others serve again."""
        self.serving = True

    def end(self) -> None:
        """The job is over: the other ranks exit. Only while they serve (after a failure inside training
        they wait in a collective of the training loop; the launcher stops them)."""
        if self.serving:
            send(self.ranks, END)
            self.serving = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def serve(model, ranks: Ranks) -> str:
    """The other ranks: answer rank 0's announcements until it sends a phase (`train`, `continue` or
    `end`), which is returned."""
    device = next(p.device for p in model.parameters())
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    while True:
        op = receive(ranks)
        if op == FORWARD:
            with torch.no_grad():
                model(input_ids=token)
        elif op == GATHER:
            gather_state_dict(model)
        else:
            return op


class AnnounceStepEnd(TrainerCallback):
    """Rank 0, after its own step-end callbacks (held-out evaluation among them): the others go on."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def on_step_end(self, args, state, control, **kwargs):
        send(self.ranks, CONTINUE)


class ServeStepEnd(TrainerCallback):
    """The other ranks, where rank 0 runs its step-end callbacks: serve its forwards until it goes on."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def on_step_end(self, args, state, control, model=None, **kwargs):
        op = serve(model, self.ranks)
        if op != CONTINUE:
            raise RuntimeError(f"rank 0 sent {op!r} in the middle of a training step")
