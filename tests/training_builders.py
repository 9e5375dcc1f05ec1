"""Builders for the training tests: a LoRA-wrapped tiny model, synthetic examples, a config, and
test-only hooks that inject real faults (out-of-memory, NaN) from inside the model's forward."""

from __future__ import annotations

import random
import weakref
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback

from lora_worker.runtime.data.examples import Example
from lora_worker.runtime.model.load import keep_cpu_layout
from lora_worker.runtime.training.trainer import TrainConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD_ID = 645  # the tiny tokenizer's pad token


def base_model(path: Path, **load):
    """The model in bf16 (`load`: more `from_pretrained` arguments, NF4 among them), frozen, without a
    KV cache, on the worker's NF4 kernels (no CPU inference repack: load.keep_cpu_layout)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **load)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    keep_cpu_layout(model)
    return model


def lora_model(path: Path, *, seed: int = 0, checkpointing: bool = True, **load):
    """The tiny model in bf16 with LoRA on all seven projections and non-reentrant checkpointing,
    the same LoRA init for the same seed (`load`: as base_model's)."""
    model = base_model(path, **load)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def synthetic_examples(n: int = 12, *, seed: int = 0, conversations: int = 6) -> list[Example]:
    """Random token sequences of 20-60 tokens, loss on their second half."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(20, 60)
        ids = tuple(rng.randrange(10, 600) for _ in range(length))
        labels = tuple(-100 if j < length // 2 else t for j, t in enumerate(ids))
        out.append(Example(f"conv-{i % conversations}", ids, labels))
    return out


def train_config(tmp: Path, **over) -> TrainConfig:
    values = dict(
        output_dir=tmp / "checkpoints",
        logging_dir=tmp / "tensorboard",
        num_epochs=2,
        learning_rate=2e-3,
        warmup_ratio=0.03,
        gradient_accumulation_steps=2,
        micro_batch_tokens=128,
        max_rows=4,
        seed=1,
        optimizer="auto",
        checkpoint_steps=1000,
        logging_steps=1,
        gradient_checkpointing=True,
        report_to=(),
    )
    return TrainConfig(**{**values, **over})


def step_records(log_history: list[dict]) -> dict[int, dict]:
    """step -> the Trainer's training log record of that step."""
    return {r["step"]: r for r in log_history if "loss" in r}


class StepTracker(TrainerCallback):
    """The step being computed (1-based) and the Trainer states and optimizers each attempt began with."""

    def __init__(self) -> None:
        self.step = 0
        self.states: list[weakref.ref] = []
        self.earlier_states_alive: list[bool] = []  # at each attempt's start: was any earlier state alive?
        self.optimizers: list[object] = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.earlier_states_alive.append(any(r() is not None for r in self.states))
        self.states.append(weakref.ref(state))
        self.optimizers.append(optimizer)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1


class InjectOOM:
    """A forward hook for a decoder layer: from step `from_step` on, a training micro-batch with more
    than `above_rows` rows allocates a large tensor and raises out-of-memory from inside the forward
    (with the step's activations alive), as a real allocator failure would.

    `error` picks the form: torch's OutOfMemoryError or CUDA's "CUDA error: out of memory"
    RuntimeError. Weak references to what the failed forward held are kept, to check that a
    retry starts only after they are released.
    """

    def __init__(self, tracker: StepTracker, *, above_rows: int, from_step: int = 1, error: str = "torch"):
        self.tracker, self.above, self.from_step, self.error = tracker, above_rows, from_step, error
        self.fired = 0
        self.held: list[weakref.ref] = []
        self.alive_at_next_forward: list[bool] | None = None

    def hook(self, module, args, output):
        if self.fired and self.alive_at_next_forward is None:
            self.alive_at_next_forward = [r() is not None for r in self.held]
        hidden = output[0] if isinstance(output, tuple) else output
        if not module.training or hidden.shape[0] <= self.above or self.tracker.step < self.from_step:
            return None
        self.fired += 1
        scratch = torch.empty(8 << 20, dtype=torch.float32)  # 32 MiB the failed step allocated
        self.held = [weakref.ref(scratch), weakref.ref(hidden)]
        message = f"tried to allocate 32.00 MiB for a micro-batch of {hidden.shape[0]} rows"
        if self.error == "torch":
            raise torch.OutOfMemoryError(f"CUDA out of memory. {message}")
        raise RuntimeError(f"CUDA error: out of memory\n{message}")


def poison_at_step(tracker: StepTracker, step: int):
    """A forward hook that turns a decoder layer's output into NaN during training step `step`."""

    def hook(module, args, output):
        if module.training and tracker.step == step:
            if isinstance(output, tuple):
                return (output[0] * float("nan"), *output[1:])
            return output * float("nan")
        return None

    return hook
