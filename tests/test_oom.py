"""Out-of-memory recovery against errors raised from inside the forward pass, with the step's
activations alive: state released before the retry, the same steps and losses as a run without
the error, the same optimizer; evaluation and generation recover too."""

from __future__ import annotations

import pytest
import torch
from training_builders import (
    PAD_ID,
    InjectOOM,
    StepTracker,
    lora_model,
    step_records,
    synthetic_examples,
    train_config,
)
from transformers import TrainerCallback

from lora_worker.runtime.device import is_out_of_memory, out_of_memory_message
from lora_worker.runtime.evaluation.generation import generate
from lora_worker.runtime.evaluation.loss import EvalOutOfMemory, held_out_loss
from lora_worker.runtime.training.oom import TrainingOutOfMemory
from lora_worker.runtime.training.trainer import train


def test_both_forms_of_out_of_memory_are_recognised():
    assert out_of_memory_message(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore")
    ) == ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    cuda = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    assert is_out_of_memory(cuda) and out_of_memory_message(cuda) == "RuntimeError: CUDA error: out of memory"
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an error torch raises for memory
    assert out_of_memory_message(KeyError("x")) is None


@pytest.mark.parametrize("error", ["torch", "cuda_runtime"])
def test_a_real_oom_inside_the_forward_is_recovered_with_the_same_steps(tiny_model, tmp_path, error):
    examples = synthetic_examples()
    clean = train(lora_model(tiny_model), examples, PAD_ID, train_config(tmp_path / "clean"), [])

    tracker = StepTracker()
    model = lora_model(tiny_model)
    oom = InjectOOM(tracker, above_rows=2, from_step=2, error=error)
    model.get_base_model().model.layers[1].register_forward_hook(oom.hook)
    outcome = train(model, examples, PAD_ID, train_config(tmp_path / "oom"), [tracker])

    assert oom.fired == 1
    (rec,) = outcome.recoveries
    assert rec.step >= 1 and rec.max_rows == 4 and rec.gradient_accumulation_steps == 2
    assert rec.message.startswith(
        "OutOfMemoryError: CUDA out of memory" if error == "torch" else "RuntimeError"
    )
    assert outcome.gradient_accumulation_steps == 4 and outcome.stopped_reason is None
    # released before the retry: what the failed forward held, and the failed Trainer (its state)
    assert oom.alive_at_next_forward == [False, False]
    assert tracker.earlier_states_alive == [False, False]
    # the retry reused the run's optimizer (bitsandbytes' paged state is allocated once per run)
    assert len(tracker.optimizers) == 2 and tracker.optimizers[0] is tracker.optimizers[1]
    # same steps, same schedule, same losses as without the error
    assert (outcome.global_step, outcome.max_steps) == (clean.global_step, clean.max_steps)
    a, b = step_records(clean.log_history), step_records(outcome.log_history)
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step]["learning_rate"] == a[step]["learning_rate"]
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-3)


def test_out_of_memory_with_one_row_per_micro_batch_fails_clearly(tiny_model, tmp_path):
    tracker = StepTracker()
    model = lora_model(tiny_model)
    model.get_base_model().model.layers[0].register_forward_hook(InjectOOM(tracker, above_rows=0).hook)
    with pytest.raises(
        TrainingOutOfMemory, match="out of memory even with one sequence per micro-batch; tried "
    ):
        train(model, synthetic_examples(), PAD_ID, train_config(tmp_path, max_rows=2), [tracker])


class OomInOptimizerStep(TrainerCallback):
    """Registers, on the run's optimizer, a step pre-hook that raises out-of-memory at `step`."""

    def __init__(self, step: int):
        self.step, self.installed = step, False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.installed:
            return
        self.installed = True
        target = self.step

        def hook(opt, args, kwargs):
            if state_box["step"] == target:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate optimizer state")

        state_box = {"step": 0}
        self.box = state_box
        optimizer.optimizer.register_step_pre_hook(hook)

    def on_step_begin(self, args, state, control, **kwargs):
        self.box["step"] = state.global_step + 1


def test_out_of_memory_inside_the_optimizer_update_is_not_retried(tiny_model, tmp_path):
    with pytest.raises(TrainingOutOfMemory, match="inside the optimizer update of step 2"):
        train(
            lora_model(tiny_model),
            synthetic_examples(),
            PAD_ID,
            train_config(tmp_path),
            [OomInOptimizerStep(2)],
        )


def test_held_out_loss_recovers_with_smaller_micro_batches(tiny_model):
    examples = synthetic_examples(8)
    model = lora_model(tiny_model)
    want = held_out_loss(model, examples, PAD_ID, token_budget=512, max_rows=8)
    assert want.retries == 0

    fired = []

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if not module.training and hidden.shape[0] > 2:
            fired.append(hidden.shape[0])
            raise torch.OutOfMemoryError(f"CUDA out of memory for {hidden.shape[0]} rows")

    handle = model.get_base_model().model.layers[1].register_forward_hook(hook)
    got = held_out_loss(model, examples, PAD_ID, token_budget=512, max_rows=8)
    assert fired and got.retries == 2 and got.token_budget == 128
    assert got.mean == pytest.approx(want.mean, rel=1e-3) and got.tokens == want.tokens
    assert got.per_conversation.keys() == want.per_conversation.keys()
    for cid, loss in want.per_conversation.items():
        assert got.per_conversation[cid] == pytest.approx(loss, rel=1e-3)
    handle.remove()

    model.get_base_model().model.layers[1].register_forward_hook(
        lambda m, a, o: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory"))
    )
    with pytest.raises(EvalOutOfMemory, match="out of memory evaluating one held-out sequence of"):
        held_out_loss(model, examples[:1], PAD_ID, token_budget=512, max_rows=8)


def test_generation_falls_back_to_fewer_new_tokens(tiny_model, tokenizer):
    model = lora_model(tiny_model)
    prompt = [{"role": "user", "content": "How much should I save each month?"}]
    prompt_len = len(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
    )
    limit = prompt_len + 20  # positions from here on "do not fit"

    def hook(module, args, kwargs):
        if int(kwargs["position_ids"].max()) >= limit:
            raise torch.OutOfMemoryError("CUDA out of memory. KV cache")

    model.get_base_model().model.register_forward_pre_hook(hook, with_kwargs=True)
    warnings: list[str] = []
    texts = generate(model, tokenizer, [prompt, prompt], max_new_tokens=64, warnings=warnings)
    assert len(texts) == 2 and texts[0] == texts[1]
    assert warnings == [
        "sample 1: out of memory at 64 new tokens; generated up to 16",
        "sample 2: out of memory at 64 new tokens; generated up to 16",
    ]
    assert texts[0]  # the shortened sample, not an empty one
