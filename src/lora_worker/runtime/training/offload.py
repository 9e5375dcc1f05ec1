"""Activation offload: the activations autograd keeps for the backward pass held in (pinned) CPU memory.

With non-reentrant activation checkpointing, what stays on the accelerator between forward and
backward is chiefly each decoder layer's input (layers x tokens x hidden x 2 bytes in bf16: about
10 GiB for Llama 3 70B at 16K tokens). `torch.autograd.graph.save_on_cpu` packs every tensor
autograd saves into CPU memory (pinned on CUDA, so the copies are asynchronous) and copies it back
when the backward pass needs it. Saved-tensor hooks apply to what is saved while they are
active, so a forward pre-hook on the decoder stack enters the context and a forward hook (run
even when the forward raises) leaves it: the decoder's saved tensors go to the CPU; the LM head
and the loss, outside the stack, are untouched. The recomputation of checkpointed layers in the
backward pass runs outside the hooks, so recomputed activations stay where they are computed.

This is the same mechanism as Transformers' `activation_checkpointing_enable(offload=True)` and
torchtune's `OffloadActivations` (which adds stream overlap); as hooks it works on any
Transformers version and leaves the Trainer stock. Costs: a device-to-host copy in the forward and
a host-to-device copy in the backward per saved tensor (slower steps), and host memory for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ActivationOffload:
    """Installed hooks; `remove()` takes them off (and leaves any context still open)."""

    module: torch.nn.Module
    handles: list = field(default_factory=list)
    active: list = field(default_factory=list)  # the save_on_cpu contexts entered and not yet left

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        while self.active:
            self.active.pop().__exit__(None, None, None)


def decoder_stack(model: torch.nn.Module) -> torch.nn.Module:
    """The module that runs the decoder layers (e.g. `LlamaModel`), found through PEFT's and
    Transformers' public accessors; the whole model when it has none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) else base


def install_activation_offload(model: torch.nn.Module) -> ActivationOffload:
    """Keep the decoder's saved activations in CPU memory (pinned when CUDA is available) while
    gradients are being recorded; evaluation and generation (no grad) are unaffected."""
    stack = decoder_stack(model)
    offload = ActivationOffload(stack)

    def enter(module, args):
        if torch.is_grad_enabled():
            # pin_memory=True pins when CUDA is available and makes a plain host copy otherwise
            ctx = torch.autograd.graph.save_on_cpu(pin_memory=True)
            ctx.__enter__()
            offload.active.append(ctx)

    def leave(module, args, output):
        if torch.is_grad_enabled() and offload.active:
            offload.active.pop().__exit__(None, None, None)

    offload.handles.append(stack.register_forward_pre_hook(enter))
    offload.handles.append(stack.register_forward_hook(leave, always_call=True))
    return offload
