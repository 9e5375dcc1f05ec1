"""The vLLM serving check: what vLLM's LoRA loader would refuse is refused before the adapter ships."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_worker.runtime.delivery.serving import (
    NotServable,
    VllmSettings,
    check_adapter_dir,
    check_lora_config,
    job_lora_problems,
    require_servable,
    vllm_max_lora_rank,
)
from lora_worker.runtime.model.load import LORA_TARGETS

GOOD = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": LORA_TARGETS, "bias": "none"}
LORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


def adapter_dir(tmp_path, config: dict, tensors: dict | None = None):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = tensors or {
        LORA_KEY.format("A"): torch.zeros(16, 64),
        LORA_KEY.format("B"): torch.zeros(64, 16),
    }
    save_file(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "adapter_model.safetensors")
    )
    return tmp_path


def test_the_workers_own_lora_is_servable_with_the_smallest_rank_setting_that_fits(tmp_path):
    check = require_servable(adapter_dir(tmp_path, GOOD), lora_name="job-7")
    assert check.ok and check.problems == ()
    assert check.vllm == VllmSettings(max_lora_rank=16, lora_name="job-7")
    assert [vllm_max_lora_rank(r) for r in (1, 2, 16, 17, 320, 321, 512, 513)] == [
        1,
        8,
        16,
        32,
        320,
        512,
        512,
        None,
    ]


def test_modules_to_save_is_refused_loudly(tmp_path):
    config = {**GOOD, "modules_to_save": ["lm_head"]}
    tensors = {
        LORA_KEY.format("A"): torch.zeros(16, 64),
        LORA_KEY.format("B"): torch.zeros(64, 16),
        "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(8, 64),
    }
    with pytest.raises(NotServable) as err:
        require_servable(adapter_dir(tmp_path, config, tensors))
    text = str(err.value)
    assert "modules_to_save ['lm_head'] is set" in text
    assert "holds tensors that are not LoRA weights: base_model.model.lm_head.modules_to_save" in text
    assert "would not load in vLLM's LoRA support" in text


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"r": 1024}, "rank 1024 is above vLLM's largest --max-lora-rank (512)"),
        ({"rank_pattern": {"q_proj": 640}}, "rank 640 is above"),
        ({"use_dora": True}, "vLLM does not support DoRA"),
        ({"bias": "lora_only"}, "bias is 'lora_only'"),
        ({"lora_bias": True}, "lora_bias is true"),
        ({"alpha_pattern": {"q_proj": 8}}, "alpha_pattern is set"),
        ({"target_modules": [*LORA_TARGETS, "lm_head"]}, "target_modules ['lm_head'] are not among"),
        ({"target_modules": r".*\.q_proj"}, "is the pattern"),
        ({"peft_type": "IA3"}, "vLLM serves LoRA adapters only"),
    ],
)
def test_each_thing_vllm_refuses_is_named(change, expected):
    check = check_lora_config({**GOOD, **change})
    assert not check.ok and check.vllm is None
    assert any(expected in p for p in check.problems), check.problems


def test_all_linear_shorthand_is_the_seven_projections():
    assert check_lora_config({**GOOD, "target_modules": "all-linear"}).ok


def test_a_folder_without_weights_or_config_says_so(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(GOOD))
    assert check_adapter_dir(tmp_path).problems == (
        "adapter_model.safetensors is missing (vLLM reads the adapter's weights from it)",
    )
    assert "cannot be read" in check_adapter_dir(tmp_path / "nowhere").problems[0]


def test_a_job_can_be_checked_before_it_trains():
    assert job_lora_problems(r=16, targets=LORA_TARGETS) == []
    assert job_lora_problems(r=600, targets=LORA_TARGETS) == [
        "rank 600 is above vLLM's largest --max-lora-rank (512); train with hyperparameters.lora_r at most 512"
    ]


def test_vllm_settings_give_the_serve_command_and_runpod_worker_env():
    v = VllmSettings(max_lora_rank=16, lora_name="job-7")
    cmd = v.serve_command("meta-llama/Meta-Llama-3-70B-Instruct", "/runpod-volume/jobs/job-7/adapter", "abc")
    assert cmd == (
        "vllm serve meta-llama/Meta-Llama-3-70B-Instruct --revision abc --enable-lora --max-lora-rank 16 "
        "--max-loras 1 --lora-modules job-7=/runpod-volume/jobs/job-7/adapter"
    )
    env = v.runpod_env("meta-llama/Meta-Llama-3-70B-Instruct", "/runpod-volume/jobs/job-7/adapter", "abc")
    assert env["ENABLE_LORA"] == "true" and env["MAX_LORA_RANK"] == "16" and env["MODEL_REVISION"] == "abc"
    assert json.loads(env["LORA_MODULES"]) == [{"name": "job-7", "path": "/runpod-volume/jobs/job-7/adapter"}]
