"""FSDP2 under the stock Trainer, on the project's micro-batch schedule (tests/fsdp_run.py).

What runs where, with the pinned versions:
- Transformers' load-time FSDP2 (`DistributedConfig`) runs on the CPU with gloo, so plain LoRA on a
  sharded bf16 model is checked here against one process. It cannot carry QLoRA: PEFT cannot put a
  LoRA layer on an NF4 weight that FSDP has already turned into a DTensor.
- QLoRA sharded by PyTorch's own `fully_shard` (NF4 stored in bf16, LoRA added before sharding)
  runs on the CPU too: checked here against one process, losses and trained LoRA weights, with a
  plain loop. The worker's own FSDP job mode trains such a model on the stock Trainer (its
  sharded-at-load path, runtime/parallel/fsdp.py), checked as whole jobs in test_multi_gpu.py.
- FSDP-QLoRA as the PEFT and bitsandbytes docs give it (NF4 stored in bf16, LoRA added before
  wrapping, Accelerate's FSDP2 plugin) needs CUDA: on the CPU Accelerate ignores the plugin and
  falls back to DDP. Its run script is checked here in one process, checkpoint and resume
  included; the two-GPU comparison is behind the `gpu` marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, two_gpus

TOLERANCE = 1e-3  # per-step loss, absolute, on losses near 6.5 (bf16 weights, gloo sums)
GPU_TOLERANCE = 5e-3  # NCCL's reductions and the CUDA NF4 kernels
RUN_S = 240  # one run on the tiny model on a busy 2-core machine
SCRIPT = REPO / "tests" / "fsdp_run.py"


def fsdp_run(tmp_path: Path, tiny_model: Path, name: str, mode: str, *, processes: int = 1,
             device: str = "cpu", resume: Path | None = None) -> dict:  # fmt: skip
    """Run tests/fsdp_run.py on `processes` ranks (torchrun when more than one); rank 0's JSON."""
    out = tmp_path / f"{name}.json"
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    args = [str(SCRIPT), str(tiny_model), str(out), mode, device, *([str(resume)] if resume else [])]
    done = subprocess.run(
        [*launcher, *args], cwd=REPO, capture_output=True, text=True, timeout=RUN_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    return result


def assert_same_losses(got: dict[int, float], want: dict[int, float], tolerance: float) -> None:
    assert got, "no training loss was logged"
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], abs=tolerance), step


@pytest.mark.e2e
def test_lora_on_a_model_sharded_at_load_matches_one_process(tiny_model, tmp_path):
    one = fsdp_run(tmp_path, tiny_model, "one", "lora-at-load")
    two = fsdp_run(tmp_path, tiny_model, "two", "lora-at-load", processes=2)
    assert one["layer"] == "LlamaDecoderLayer" and one["base_weight_share"] == 1.0
    # sharded for real: each rank keeps half of every base weight
    assert two["layer"] == "FSDPLlamaDecoderLayer" and two["base_weight_share"] == 0.5
    assert sorted(two["losses"]) == sorted(one["losses"]) and len(one["losses"]) >= 3
    assert_same_losses(two["losses"], one["losses"], TOLERANCE)


@pytest.mark.e2e
def test_qlora_sharded_by_fully_shard_trains_as_one_process(tiny_model, tmp_path):
    one = fsdp_run(tmp_path, tiny_model, "one", "qlora-fully-shard")
    two = fsdp_run(tmp_path, tiny_model, "two", "qlora-fully-shard", processes=2)
    assert two["layer"] == "FSDPLlamaDecoderLayer" and two["base_weight_share"] == 0.5
    assert sorted(two["losses"]) == sorted(one["losses"]) and len(one["losses"]) >= 3
    assert_same_losses(two["losses"], one["losses"], TOLERANCE)
    # the LoRA weights, gathered whole from the shards, are the ones one process trained
    assert sorted(two["lora_norms"]) == sorted(one["lora_norms"]) and len(one["lora_norms"]) == 28
    for name, norm in two["lora_norms"].items():
        assert norm == pytest.approx(one["lora_norms"][name], rel=1e-3), name
    assert all(norm > 0 for name, norm in one["lora_norms"].items() if "lora_B" in name)  # B starts at 0


@pytest.mark.e2e
def test_the_fsdp_qlora_run_resumes_from_its_checkpoint(tiny_model, tmp_path):
    """The FSDP-QLoRA script in one process: NF4 stored in bf16 trains, and a checkpoint of it
    (adapter, optimizer, schedule) resumes to the same losses as the run that went on."""
    whole = fsdp_run(tmp_path, tiny_model, "whole", "qlora")
    assert len(whole["losses"]) >= 4 and whole["losses"][max(whole["losses"])] < whole["losses"][1]
    resumed = fsdp_run(
        tmp_path, tiny_model, "resumed", "qlora", resume=Path(whole["checkpoints"]) / "checkpoint-2"
    )
    assert whole["steps_run"][0] == 1 and resumed["steps_run"] == [s for s in whole["steps_run"] if s > 2]
    assert_same_losses(resumed["losses"], whole["losses"], TOLERANCE)


@pytest.mark.gpu
def test_fsdp_qlora_on_two_gpus_matches_one_and_resumes_on_one(tiny_model, tmp_path):
    """FSDP-QLoRA on two GPUs: NF4 weights sharded by FSDP2, LoRA trained, the same per-step losses
    as one GPU; its checkpoint (full state dicts) resumes on one GPU to the same losses."""
    two_gpus()
    one = fsdp_run(tmp_path, tiny_model, "one", "qlora", device="cuda")
    two = fsdp_run(tmp_path, tiny_model, "two", "qlora", processes=2, device="cuda")
    assert two["layer"].startswith("FSDP") and two["base_weight_share"] == 0.5, two
    assert sorted(two["losses"]) == sorted(one["losses"])
    assert_same_losses(two["losses"], one["losses"], GPU_TOLERANCE)
    resumed = fsdp_run(
        tmp_path,
        tiny_model,
        "resumed",
        "qlora",
        device="cuda",
        resume=Path(two["checkpoints"]) / "checkpoint-2",
    )
    assert resumed["steps_run"] == [s for s in one["steps_run"] if s > 2]
    assert_same_losses(resumed["losses"], one["losses"], GPU_TOLERANCE)
