"""Training on the tiny model: every step learns, resume restores the optimizer and the schedule,
NaN stops training, progress events carry their own step's numbers, activation offload is exact."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from peft import PeftModel
from training_builders import (
    PAD_ID,
    StepTracker,
    base_model,
    lora_model,
    poison_at_step,
    step_records,
    synthetic_examples,
    train_config,
)
from transformers import TrainerCallback

from lora_worker.runtime.evaluation.loss import NonFiniteLoss, eval_loss, held_out_loss
from lora_worker.runtime.events.progress import CostMeter, Reporter
from lora_worker.runtime.training.callbacks import EvalCallback, ProgressCallback, StopCallback
from lora_worker.runtime.training.checkpoints import complete_checkpoints
from lora_worker.runtime.training.schedule import few_steps_warning, lr_factor, warmup_steps_for
from lora_worker.runtime.training.trainer import adapter_update_norm, train


def lora_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for n, p in model.named_parameters() if "lora_" in n])


# ----------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("total", [1, 2, 3, 7, 33, 500])
@pytest.mark.parametrize("ratio", [0.0, 0.03, 0.1, 0.5, 1.0])
def test_every_step_has_a_positive_learning_rate(total, ratio):
    warmup = warmup_steps_for(total, ratio)
    factors = [lr_factor(s, total_steps=total, warmup_steps=warmup) for s in range(total)]
    assert all(0 < f <= 1 for f in factors), factors
    assert warmup < total and factors[warmup] == 1.0  # the peak is reached, even with 1 step
    assert factors == sorted(factors[:warmup]) + sorted(factors[warmup:], reverse=True)


def test_few_steps_warning_says_how_to_get_more():
    text = few_steps_warning(1, micro_batches_per_epoch=3, gradient_accumulation_steps=4, num_epochs=1)
    assert text.startswith("only 1 optimizer step planned")
    assert "gradient_accumulation_steps 1 gives 3 steps" in text
    assert "num_epochs 14" in text  # 14 epochs x 3 micro-batches / 4 per step >= 10 steps
    assert "batch_size" in text
    assert (
        few_steps_warning(10, micro_batches_per_epoch=40, gradient_accumulation_steps=4, num_epochs=1) is None
    )


# ----------------------------------------------------------------------------- one step learns


def test_a_one_step_run_changes_the_saved_adapters_logits(tiny_model, tmp_path):
    """Planned to ONE optimizer step with warmup: that step must not run at learning rate 0."""
    examples = synthetic_examples(4)
    model = lora_model(tiny_model)
    assert adapter_update_norm(model) == 0.0
    cfg = train_config(tmp_path, num_epochs=1, gradient_accumulation_steps=16, warmup_ratio=0.03)
    outcome = train(model, examples, PAD_ID, cfg, [])
    assert (outcome.global_step, outcome.max_steps, outcome.stopped_reason) == (1, 1, None)
    assert step_records(outcome.log_history)[1]["learning_rate"] == pytest.approx(cfg.learning_rate)
    assert outcome.adapter_update_norm > 0 and adapter_update_norm(model) == outcome.adapter_update_norm

    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        base_logits = base_model(tiny_model)(input_ids=ids).logits.float()
        adapted = PeftModel.from_pretrained(base_model(tiny_model), tmp_path / "adapter")
        adapted_logits = adapted(input_ids=ids).logits.float()
    assert (adapted_logits - base_logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------- resume


class StopAt(TrainerCallback):
    """Stop with a checkpoint after `step`, as a cancel or a time limit does."""

    def __init__(self, step: int):
        self.step, self.reason = step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.reason = "stopped by the test"
            control.should_save = control.should_training_stop = True


def test_resume_restores_optimizer_and_schedule_exactly(tiny_model, tmp_path):
    examples = synthetic_examples()
    straight_model = lora_model(tiny_model)
    straight = train(straight_model, examples, PAD_ID, train_config(tmp_path / "straight"), [])

    cfg = train_config(tmp_path / "resumed")
    first = train(lora_model(tiny_model), examples, PAD_ID, cfg, [StopAt(2)])
    assert (first.global_step, first.stopped_reason) == (2, "stopped by the test")
    resumed_model = lora_model(tiny_model)  # a new process: fresh adapter and optimizer
    resumed = train(resumed_model, examples, PAD_ID, cfg, [])
    assert resumed.resumed_from_step == 2 and resumed.resume_reason == "resuming from checkpoint-2, verified"
    assert resumed.global_step == straight.global_step == 5

    # Adam's moments and the LR schedule continue where they were: the same steps, to the bit
    a, b = step_records(straight.log_history), step_records(resumed.log_history)
    for step in (3, 4, 5):
        assert b[step]["learning_rate"] == a[step]["learning_rate"]
        assert b[step]["loss"] == a[step]["loss"]
    assert torch.equal(lora_weights(resumed_model), lora_weights(straight_model))
    assert resumed.epoch == 2.0 and resumed.epochs_this_run == pytest.approx(2.0 * 3 / 5)


# ----------------------------------------------------------------------------- what is reported


def test_events_carry_their_own_steps_metrics_and_job_epochs(tiny_model, tmp_path, capsys):
    examples = synthetic_examples()
    model = lora_model(tiny_model)
    # a real Reporter, rate-limited so that only evaluation steps are due at once
    reporter = Reporter("j", meter=CostMeter(0.0), channels=[], min_interval_s=3600)
    progress = ProgressCallback(reporter, tokens_per_epoch=1000, num_epochs=2)

    def evaluate():
        return eval_loss(model, examples[:4], PAD_ID, token_budget=256, max_rows=4)

    callbacks = [progress, EvalCallback(evaluate, 2, progress.record_eval)]
    outcome = train(model, examples, PAD_ID, train_config(tmp_path), callbacks)
    assert outcome.global_step == 5

    assert "{'loss'" not in capsys.readouterr().out  # the Trainer's own printed dicts are gone
    records = step_records(outcome.log_history)
    events = [e for e in reporter.events if e.metrics is not None]
    for e in events:  # each event has its own step's loss and LR, never the previous step's
        assert e.metrics.loss == pytest.approx(records[e.step]["loss"])
        assert e.metrics.learning_rate == pytest.approx(records[e.step]["learning_rate"])
        assert e.metrics.epoch == records[e.step]["epoch"]
    evals = {r["step"]: r["eval_loss"] for r in outcome.log_history if "eval_loss" in r}
    assert sorted(evals) == [2, 4]  # every 2 steps, not on the last (the job evaluates after training)
    # the evaluation steps' events went out despite the rate limit, with that step's metrics
    with_eval = [e for e in events if e.evaluation and e.evaluation.step == e.step]
    assert [e.step for e in with_eval] == [2, 4]
    assert [e.evaluation.eval_loss for e in with_eval] == pytest.approx([evals[2], evals[4]])
    # job epochs, not the Trainer's single pass: 2 epochs of 10 micro-batches in 5 steps of 2 (GA)
    assert [records[s]["epoch"] for s in sorted(records)] == [0.4, 0.8, 1.2, 1.6, 2.0]
    assert outcome.epoch == 2.0


def test_a_cancel_stops_within_a_step_with_a_checkpoint(tiny_model, tmp_path):
    cancel = threading.Event()
    cancel.set()
    stop = StopCallback(cancel, max_seconds=3600, max_cost_usd=None, hourly_usd=0.0, elapsed=lambda: 0.0)
    cfg = train_config(tmp_path)
    outcome = train(lora_model(tiny_model), synthetic_examples(), PAD_ID, cfg, [stop])
    assert (outcome.global_step, outcome.stopped_reason) == (1, "cancelled")
    assert [p.name for p in complete_checkpoints(cfg.output_dir)] == ["checkpoint-1"]


# ----------------------------------------------------------------------------- NaN


def test_a_nan_loss_stops_training_before_it_reaches_the_adapter(tiny_model, tmp_path):
    tracker = StepTracker()
    model = lora_model(tiny_model)
    model.get_base_model().model.layers[1].register_forward_hook(poison_at_step(tracker, 3))
    cfg = train_config(tmp_path, checkpoint_steps=1)
    outcome = train(model, synthetic_examples(), PAD_ID, cfg, [tracker])

    assert outcome.stopped_reason.startswith("non-finite loss at step 3")
    assert outcome.global_step == 3 and outcome.global_step < outcome.max_steps
    assert math.isnan(step_records(outcome.log_history)[3]["loss"])
    assert torch.isfinite(lora_weights(model)).all()
    # no checkpoint of the NaN step: a resume continues from the last good one
    assert [p.name for p in complete_checkpoints(cfg.output_dir)] == ["checkpoint-1", "checkpoint-2"]


def test_a_non_finite_held_out_loss_is_an_error_and_stops_training(tiny_model, tmp_path):
    examples = synthetic_examples()
    model = lora_model(tiny_model)
    tracker = StepTracker()
    poisoned = {"on": False}

    def hook(module, args, output):
        return output * float("nan") if poisoned["on"] and not module.training else None

    model.get_base_model().model.layers[0].register_forward_hook(hook)
    assert eval_loss(model, examples[:3], PAD_ID, token_budget=256, max_rows=4) is not None
    poisoned["on"] = True
    with pytest.raises(NonFiniteLoss, match="held-out loss is nan over"):
        held_out_loss(model, examples[:3], PAD_ID, token_budget=256, max_rows=4)

    def evaluate():
        return eval_loss(model, examples[:3], PAD_ID, token_budget=256, max_rows=4)

    eval_cb = EvalCallback(evaluate, 2, lambda state, loss: None)
    cfg = train_config(tmp_path, checkpoint_steps=1)
    outcome = train(model, examples, PAD_ID, cfg, [tracker, eval_cb])
    assert outcome.stopped_reason.startswith("non-finite held-out loss at step 2: held-out loss is nan")
    assert [p.name for p in complete_checkpoints(cfg.output_dir)] == ["checkpoint-1"]


# ----------------------------------------------------------------------------- activation offload


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """torch's save_on_cpu, counting the tensors it packs (a spy, not a replacement)."""

    packed = 0

    def __init__(self, pin_memory: bool = False, device_type: str = "cuda") -> None:
        super().__init__(pin_memory=pin_memory, device_type=device_type)
        pack, unpack = self.pack_hook, self.unpack_hook

        def counting_pack(tensor):
            CountingSaveOnCpu.packed += 1
            return pack(tensor)

        self.pack_hook, self.unpack_hook = counting_pack, unpack


def test_activation_offload_trains_the_same_steps(tiny_model, tmp_path, monkeypatch):
    examples = synthetic_examples()
    plain_model = lora_model(tiny_model)
    plain = train(plain_model, examples, PAD_ID, train_config(tmp_path / "plain"), [])

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    offload_model = lora_model(tiny_model)
    cfg = train_config(tmp_path / "offload", activation_offload=True)
    offloaded = train(offload_model, examples, PAD_ID, cfg, [])

    assert CountingSaveOnCpu.packed > 0  # the decoder's saved activations went through the CPU copy
    a, b = step_records(plain.log_history), step_records(offloaded.log_history)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert [b[s]["loss"] for s in b] == [a[s]["loss"] for s in a]
    assert torch.equal(lora_weights(offload_model), lora_weights(plain_model))
    # the hooks are removed afterwards: evaluation and a later run are untouched
    CountingSaveOnCpu.packed = 0
    offload_model.train()
    offload_model(input_ids=torch.tensor([examples[0].input_ids])).logits.sum().backward()
    assert CountingSaveOnCpu.packed == 0
