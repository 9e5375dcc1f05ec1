"""Warm start: `init_adapter` starts training from a previous adapter (checked against the job's LoRA
settings before any weight loads), and the previous adapter's held-out loss is measurable next to the
new one's on the same examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_job

from lora_worker.runtime.data import prepare_dataset
from lora_worker.runtime.delivery.adapter import save_adapter
from lora_worker.runtime.evaluation.loss import held_out_loss
from lora_worker.runtime.evaluation.verdict import decide
from lora_worker.runtime.model.load import LORA_TARGETS, add_lora, load_base_model, load_tokenizer
from lora_worker.runtime.model.prepare import (
    WarmStartRefused,
    held_out_with_adapter,
    load_for_training,
    warm_start_base_problems,
    warm_start_source,
)
from lora_worker.runtime.model.resolve import ResolvedModel
from lora_worker.runtime.spec import parse_job_input


def spec_for(tiny_model, small_dataset, init_adapter: str, **hp):
    job = small_job(tiny_model, small_dataset, job_id="warm", init_adapter=init_adapter)
    job["hyperparameters"] = {**job["hyperparameters"], "lora_r": 8, "lora_alpha": 16, **hp}
    return parse_job_input(job)


@pytest.fixture(scope="module")
def previous(tmp_path_factory, tiny_model):
    """A saved r=8 adapter (bf16, as delivered) whose B matrices are not zero: a trained one."""
    model, _ = add_lora(
        load_base_model(tiny_model), r=8, alpha=16, dropout=0.0, seed=3, gradient_checkpointing=False
    )
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    dest = save_adapter(model, load_tokenizer(tiny_model), tmp_path_factory.mktemp("prev") / "adapter")
    return dest, {
        n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters() if "lora_" in n
    }


def test_a_mismatched_adapter_is_refused_from_its_config_alone(tmp_path, tiny_model, small_dataset):
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"not even a safetensors file: never read")
    with pytest.raises(WarmStartRefused) as err:
        warm_start_source(spec_for(tiny_model, small_dataset, str(folder)), tmp_path)
    assert err.value.problems == [
        f"init_adapter: {str(folder)!r} cannot start this job: its rank r is 16, this job's hyperparameters.lora_r is 8",
        f"init_adapter: {str(folder)!r} cannot start this job: its lora_alpha is 32, this job's "
        "hyperparameters.lora_alpha is 16",
        f"init_adapter: {str(folder)!r} cannot start this job: its target_modules are ['q_proj', 'v_proj'], this "
        f"job trains {sorted(LORA_TARGETS)}",
        "init_adapter: give the job the previous adapter's LoRA settings, or leave init_adapter out",
    ]
    (tmp_path / "jobs" / "still-running").mkdir(parents=True)
    with pytest.raises(WarmStartRefused, match=r"init_adapter: job 'still-running' has no result yet"):
        warm_start_source(spec_for(tiny_model, small_dataset, "still-running"), tmp_path)


def test_the_previous_adapter_must_fit_the_jobs_base(previous, tiny_model, small_dataset, tmp_path):
    source = warm_start_source(spec_for(tiny_model, small_dataset, str(previous[0])), tmp_path)
    same = source.base_model  # the folder the adapter names (the tiny model)
    assert warm_start_base_problems(source, same, None) == ([], [])
    problems, _ = warm_start_base_problems(source, "meta-llama/Meta-Llama-3-8B", None)
    assert problems == [
        f"init_adapter: it was trained on the base model {same}, this job trains on meta-llama/Meta-Llama-3-8B; "
        "an adapter only fits the base it was trained on"
    ]
    pinned = type(source)(**{**source.__dict__, "base_model": "org/m", "base_revision": "a" * 40})
    assert warm_start_base_problems(pinned, "org/m", "b" * 40) == (
        [],
        [f"init_adapter was trained on org/m at commit {'a' * 40}; this job uses commit {'b' * 40}"],
    )
    assert source.as_previous().path == str(previous[0].resolve())


def test_training_starts_from_the_previous_weights_and_its_loss_stays_measurable(
    previous, tiny_model, small_dataset, tmp_path
):
    folder, saved = previous
    spec = spec_for(tiny_model, small_dataset, str(folder), lora_dropout=0.1)
    tokenizer = load_tokenizer(tiny_model)
    resolved = ResolvedModel(
        path=Path(tiny_model), source="local_dir", model_id=str(tiny_model), revision=None
    )
    loaded = load_for_training(resolved, tokenizer, spec, tmp_path)
    model = loaded.model
    assert loaded.init_adapter == folder.resolve() and loaded.info("cpu")["init_adapter"] == str(
        folder.resolve()
    )
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora.keys() == saved.keys()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())  # trainable, upcast
    assert all(torch.equal(lora[n].detach(), saved[n]) for n in lora)  # exactly the delivered weights
    assert model.peft_config["default"].lora_dropout == 0.1  # the job's dropout, not the saved one

    data = prepare_dataset(
        small_dataset, tokenizer, max_seq_length=1024, eval_fraction=0.34, max_eval=2, seed=1
    )

    def measure(m):
        return held_out_loss(m, data.eval, tokenizer.pad_token_id, token_budget=4096, max_rows=4)

    with model.disable_adapter():
        base = measure(model)
    start = measure(model)  # the previous adapter, as loaded: the warm start's step 0
    with torch.no_grad():  # "training" moves the job's adapter away from the previous one
        for p in lora.values():
            p.add_(torch.randn_like(p) * 0.05)
    after = measure(model)
    previous_loss = held_out_with_adapter(model, folder, measure)
    assert previous_loss.mean == pytest.approx(start.mean, rel=1e-6)
    assert start.mean != pytest.approx(base.mean, rel=1e-4) and after.mean != pytest.approx(
        start.mean, rel=1e-4
    )
    # the job's own adapter is active again, unchanged, and the second adapter is gone
    assert model.active_adapter == "default" and list(model.peft_config) == ["default"]
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert measure(model).mean == pytest.approx(after.mean, rel=1e-6)
    versus = decide(
        previous_loss.mean, after.mean, per_conversation_before=previous_loss.per_conversation,
        per_conversation_after=after.per_conversation,
    )  # fmt: skip
    assert versus.verdict in ("improved", "unchanged", "worse") and versus.conversations == len(
        data.eval_conversations
    )


@pytest.mark.e2e
def test_a_warm_started_job_names_and_compares_with_its_previous_adapter(tmp_path, tiny_model, small_dataset):
    from lora_worker.runtime.job import run_job
    from lora_worker.runtime.settings import Settings

    settings = Settings.from_env({"VOLUME_DIR": str(tmp_path)})
    first = run_job(small_job(tiny_model, small_dataset, job_id="first"), settings=settings)
    assert first["status"] == "completed", first.get("error")
    refused = run_job(
        small_job(
            tiny_model, small_dataset, job_id="refused", init_adapter="first", hyperparameters={"lora_r": 8}
        ),
        settings=settings,
    )
    assert refused["status"] == "failed" and refused["stage"] == "resolving_model"  # before any weight
    assert (
        "init_adapter: 'first' cannot start this job: its rank r is 16, this job's hyperparameters.lora_r is 8"
        in (refused["error"])
    )
    second = run_job(
        small_job(tiny_model, small_dataset, job_id="second", init_adapter="first"), settings=settings
    )
    assert second["status"] == "completed", second.get("error")
    assert second["lineage"]["previous_adapter"]["job_id"] == "first"
    assert second["lineage"]["previous_adapter"]["dataset_sha256"] == first["lineage"]["dataset"]["sha256"]
    # the base's loss is measured with the adapter disabled: the same as the first job's baseline
    assert second["metrics"]["eval_loss_before"] == pytest.approx(
        first["metrics"]["eval_loss_before"], rel=1e-6
    )
    # ... and the adapter it started from, on the same held-out set, is the first job's final adapter
    assert second["metrics"]["eval_loss_previous"] == pytest.approx(
        first["metrics"]["eval_loss_after"], abs=1e-4
    )
    assert second["versus_previous"]["verdict"] in ("improved", "unchanged", "worse")
    card = (Path(second["lora_artifact_path"]) / "README.md").read_text()
    assert "| Started from | first |" in card and "Against the previous adapter it started from: **" in card
