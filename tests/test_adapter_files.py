"""The delivered adapter folder: bf16 weights (fp32 on request), the base named by Hub id and commit,
the base's licence files, and a model card that says what it is and how to load and serve it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_builders import HUB_ID, NO_HUB, SHA, runpod_cached_model
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from lora_worker.runtime.delivery.adapter import BaseIdentity, base_identity, save_adapter
from lora_worker.runtime.delivery.card import CardFacts, llama_licence, render_card, write_notice
from lora_worker.runtime.delivery.serving import check_lora_config, require_servable
from lora_worker.runtime.model.load import LORA_TARGETS, add_lora, load_base_model, load_tokenizer
from lora_worker.runtime.model.resolve import resolve_model_meta, resolve_model_weights

LLAMA3 = "meta-llama/Meta-Llama-3-70B-Instruct"


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model):
    """A PEFT model on the tiny base resolved by Hub id from RunPod's cache layout on a volume."""
    volume = tmp_path_factory.mktemp("volume")
    runpod_cached_model(volume, tiny_model)
    meta = resolve_model_meta(HUB_ID, volume_dir=volume, hf_token=None, hf_endpoint=NO_HUB)
    resolved = resolve_model_weights(meta, volume_dir=volume, hf_token=None, hf_endpoint=NO_HUB)
    assert (resolved.source, resolved.model_id, resolved.revision) == ("runpod_cache", HUB_ID, SHA)
    model, _ = add_lora(
        load_base_model(resolved.path), r=8, alpha=16, dropout=0.0, seed=1, gradient_checkpointing=False
    )
    torch.manual_seed(2)
    with torch.no_grad():  # a trained adapter's B is not zero: give it values bf16 must round
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return resolved, load_tokenizer(resolved.path), model


def _dtypes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_saved_adapter_is_bf16_names_the_hub_base_and_carries_its_licence(cached, tmp_path):
    resolved, tokenizer, model = cached
    base = base_identity(resolved.model_id, resolved.revision, resolved.path)
    dest = save_adapter(model, tokenizer, tmp_path / "adapter", base=base)

    config = json.loads((dest / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID and config["revision"] == SHA
    assert str(tmp_path) not in json.dumps(config) and "huggingface-cache" not in json.dumps(config)
    weights = dest / "adapter_model.safetensors"
    assert _dtypes(weights) == {"BF16"}
    saved = load_file(str(weights))
    live = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert saved.keys() == live.keys() and len(saved) == 2 * 2 * len(LORA_TARGETS)  # 2 layers, A and B
    assert all(torch.equal(saved[k], live[k].detach().to(torch.bfloat16)) for k in saved)
    assert (dest / "LICENSE").read_bytes().startswith(b"META LLAMA 3 COMMUNITY LICENSE")
    assert (dest / "USE_POLICY.md").is_file()
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in dest.iterdir()
    }
    assert not (
        dest / "README.md"
    ).exists()  # PEFT's placeholder card is gone; package_outputs writes the card
    assert not dest.with_name("adapter.tmp").exists()
    assert require_servable(dest).vllm.max_lora_rank == 8


def test_fp32_on_request_keeps_the_weights_exactly_and_reloads_with_peft(cached, tmp_path):
    resolved, tokenizer, model = cached
    dest = save_adapter(model, tokenizer, tmp_path / "adapter", dtype="fp32")
    assert _dtypes(dest / "adapter_model.safetensors") == {"F32"}
    x = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=x).logits
        reloaded = PeftModel.from_pretrained(load_base_model(resolved.path), str(dest))
        reloaded.eval()
        got = reloaded(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-4)  # the adapter changes the outputs


def test_a_hub_cache_snapshot_folder_keeps_its_hub_identity(tmp_path):
    snap = Path(
        "/runpod-volume/huggingface-cache/hub/models--meta-llama--Meta-Llama-3-70B-Instruct/snapshots"
    ) / ("a" * 40)
    assert base_identity(str(snap), None, snap) == BaseIdentity(LLAMA3, "a" * 40, snap)
    assert base_identity(str(tmp_path), None, tmp_path) == BaseIdentity(str(tmp_path), None, tmp_path)
    assert base_identity(HUB_ID, SHA, tmp_path) == BaseIdentity(HUB_ID, SHA, tmp_path)


def facts(**over) -> CardFacts:
    lora = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": LORA_TARGETS, "bias": "none"}
    values = dict(
        job_id="job-7",
        base_model=LLAMA3,
        base_revision="a" * 40,
        lora=lora,
        weights_dtype="bf16",
        verdict="improved",
        headline="held-out loss 2.1000 -> 1.8000 (-14.3 %)",
        metrics={"eval_loss_before": 2.1, "eval_loss_after": 1.8, "steps": 40, "epochs": 3.0},
        dataset={
            "name": "brightrun-lora-v4",
            "version": "4.0.0",
            "consultant": "Elena Morales, CFP",
            "conversations": 24,
            "train_conversations": 22,
            "eval_conversations": 2,
        },  # fmt: skip
        lineage={
            "dataset": {
                "file_name": "export.json",
                "sha256": "f" * 64,
                "name": "brightrun-lora-v4",
                "version": "4.0.0",
                "conversations": 24,
                "pairs": 156,
            },  # fmt: skip
            "settings": {"hyperparameters": {"num_epochs": 3, "learning_rate": 0.0002, "seed": 42}},
            "previous_adapter": {"job_id": "job-6", "path": "/runpod-volume/jobs/job-6/adapter"},
        },
        versus_previous={"verdict": "improved", "reason": "held-out loss 1.9000 -> 1.8000 (-5.3 %)"},
        serving=check_lora_config(lora, lora_name="job-7").model_dump(mode="json"),
        licence_files=("LICENSE", "USE_POLICY.md", "NOTICE"),
    )
    return CardFacts(**{**values, **over})


def test_the_card_says_what_the_adapter_is_how_to_load_and_serve_it_and_its_llama_3_licence():
    card = render_card(facts())
    for text in (
        f"base_model: {LLAMA3}",
        "library_name: peft",
        "license: llama3",
        "**Built with Meta Llama 3**",
        f"commit `{'a' * 40}`",
        f"`{'f' * 64}`",  # the dataset's SHA-256
        "| Version | 4.0.0 |",
        "| Conversations | 24 |",
        "| Verdict | improved |",
        "| Held-out loss, this adapter | 1.8000 |",
        "Against the previous adapter it started from: **improved**",
        "| Started from | job-6 |",
        "## Intended use",
        "Elena Morales, CFP",
        "AutoPeftModelForCausalLM.from_pretrained",
        f"vllm serve {LLAMA3} --revision {'a' * 40} --enable-lora --max-lora-rank 16",
        "--lora-modules job-7=path/to/this/folder",
        "ENABLE_LORA=true",
        "MAX_LORA_RANK=16",
        f"MODEL_REVISION={'a' * 40}",
        "https://llama.meta.com/llama3/license/",
        "https://llama.meta.com/llama3/use-policy/",
        'begins with "Llama 3"',
        "Included here: `LICENSE`, `USE_POLICY.md`, `NOTICE`.",
    ):
        assert text in card, text
    assert render_card(facts()) == card  # a pure function of the facts


def test_later_llama_3_releases_get_their_own_notice_and_other_bases_none(tmp_path):
    card = render_card(facts(base_model="meta-llama/Llama-3.3-70B-Instruct", licence_files=()))
    assert "**Built with Llama**" in card and "license: llama3.3" in card
    assert "https://llama.meta.com/llama3_3/license/" in card and "Pass on a copy of the licence" in card
    plain = render_card(facts(base_model=HUB_ID, licence_files=()))
    assert "Built with" not in plain and "license:" not in plain
    assert llama_licence("mistralai/Mistral-7B-v0.1") is None

    write_notice(tmp_path, LLAMA3)
    assert (tmp_path / "NOTICE").read_text() == (
        "Meta Llama 3 is licensed under the Meta Llama 3 Community License, Copyright © Meta Platforms, Inc. "
        "All Rights Reserved.\n"
    )
    write_notice(tmp_path / "nothing", HUB_ID)  # not a Llama 3 base: no NOTICE, no folder needed


def test_an_unservable_adapter_says_so_in_its_card_and_dataset_text_cannot_inject_markup():
    bad = check_lora_config(
        {"peft_type": "LORA", "r": 16, "target_modules": LORA_TARGETS, "modules_to_save": ["x"]}
    )
    card = render_card(facts(serving=bad.model_dump(mode="json"), dataset={"name": "<script>x</script> | y"}))
    assert "would **not** load in vLLM" in card and "modules_to_save ['x'] is set" in card
    assert "<script>" not in card
