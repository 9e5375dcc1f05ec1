"""Will vLLM load this adapter? The checks vLLM's LoRA loader makes, made before the adapter ships.

What vLLM accepts, from its source (vllm-project/vllm: `vllm/config/lora.py`, `vllm/lora/peft_helper.py`,
`vllm/model_executor/models/llama.py`):

- `--max-lora-rank` takes one of 1, 8, 16, 32, 64, 128, 256, 320, 512, and an adapter whose rank
  (its largest, `rank_pattern` included) is above it is refused; so rank 512 is the ceiling.
- For Llama (`LlamaForCausalLM`) LoRA applies to q/k/v_proj (packed as qkv_proj), o_proj,
  gate/up_proj (packed as gate_up_proj) and down_proj. Embedding and LM-head LoRA depend on the
  vLLM version and are not accepted here.
- `modules_to_save` must be empty, DoRA (`use_dora`) is not supported, and bias must be "none";
  PEFT's `lora_bias` is not loaded (the worker-vllm image lists `--enable-lora-bias` as removed).
- `alpha_pattern` is not read (vLLM scales every module by lora_alpha / r), so an adapter with
  one would be served with the wrong scaling.
- Weights are read from `adapter_model.safetensors`; only `lora_A` / `lora_B` tensors are loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open

# vllm/config/lora.py: MaxLoRARanks
VLLM_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vllm/model_executor/models/llama.py: packed_modules_mapping plus the unpacked projections
VLLM_LLAMA_TARGETS: frozenset[str] = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_LORA_TENSOR = re.compile(r"\.lora_[AB]\.weight$")


class NotServable(ValueError):
    """The adapter would not load in vLLM; `problems` lists each reason."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"{where} would not load in vLLM's LoRA support:\n" + "\n".join(f"  - {p}" for p in problems)
        )


class VllmSettings(BaseModel):
    """What to give vLLM (or RunPod's vLLM worker) to serve the adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_lora_rank: int = Field(
        description="--max-lora-rank: the smallest allowed value at or above the rank."
    )
    max_loras: int = Field(1, description="--max-loras: adapters in one batch.")
    lora_name: str = Field(description="The name requests use as `model` to get this adapter.")

    def serve_command(self, base_model: str, adapter_path: str, revision: str | None = None) -> str:
        rev = f" --revision {revision}" if revision else ""
        return (
            f"vllm serve {base_model}{rev} --enable-lora --max-lora-rank {self.max_lora_rank} "
            f"--max-loras {self.max_loras} --lora-modules {self.lora_name}={adapter_path}"
        )

    def runpod_env(self, base_model: str, adapter_path: str, revision: str | None = None) -> dict[str, str]:
        """Environment of RunPod's vLLM worker (runpod-workers/worker-vllm) serving the adapter."""
        env = {
            "MODEL_NAME": base_model,
            "ENABLE_LORA": "true",
            "MAX_LORA_RANK": str(self.max_lora_rank),
            "MAX_LORAS": str(self.max_loras),
            "LORA_MODULES": json.dumps([{"name": self.lora_name, "path": adapter_path}]),
        }
        if revision:
            env["MODEL_REVISION"] = revision
        return env


class ServingCheck(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    problems: tuple[str, ...] = ()
    vllm: VllmSettings | None = Field(None, description="None when the adapter cannot be served.")


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` value that admits `rank`, or None above vLLM's ceiling."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def lora_config_problems(config: Mapping[str, Any]) -> list[str]:
    """What in an adapter_config.json vLLM would refuse or serve wrongly (empty when servable)."""
    problems: list[str] = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    ranks = [config.get("r"), *dict(config.get("rank_pattern") or {}).values()]
    ranks = [r for r in ranks if isinstance(r, int)]
    if not ranks:
        problems.append("r (the LoRA rank) is missing")
    elif vllm_max_lora_rank(max(ranks)) is None:
        problems.append(
            f"rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}); "
            f"train with hyperparameters.lora_r at most {VLLM_MAX_LORA_RANKS[-1]}"
        )
    problems += _target_problems(config.get("target_modules"))
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save {config['modules_to_save']} is set; vLLM only loads adapters without "
            "fully trained extra modules"
        )
    if config.get("use_dora"):
        problems.append("use_dora is true; vLLM does not support DoRA")
    if (config.get("bias") or "none") != "none":
        problems.append(f"bias is {config['bias']!r}; vLLM supports bias 'none' only")
    if config.get("lora_bias"):
        problems.append("lora_bias is true; vLLM does not load LoRA bias terms")
    if config.get("alpha_pattern"):
        problems.append("alpha_pattern is set; vLLM scales every module by lora_alpha / r and ignores it")
    return problems


def _target_problems(targets: Any) -> list[str]:
    if targets == "all-linear":  # PEFT's shorthand: on Llama, exactly the seven projections
        return []
    if isinstance(targets, str):
        names = ", ".join(sorted(VLLM_LLAMA_TARGETS))
        return [
            f"target_modules is the pattern {targets!r}; name the modules (vLLM's Llama targets: {names})"
        ]
    if not targets:
        return ["target_modules is empty"]
    unsupported = sorted({str(t) for t in targets} - VLLM_LLAMA_TARGETS)
    if unsupported:
        return [
            f"target_modules {unsupported} are not among vLLM's LoRA modules for Llama "
            f"({', '.join(sorted(VLLM_LLAMA_TARGETS))})"
        ]
    return []


def tensor_problems(weights: Path) -> list[str]:
    """Tensors in the weights file that vLLM would not load as LoRA weights (names only, no data read)."""
    if not weights.is_file():
        return [f"{weights.name} is missing (vLLM reads the adapter's weights from it)"]
    with safe_open(str(weights), framework="pt") as f:
        extra = sorted(k for k in f.keys() if not _LORA_TENSOR.search(k))
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return [f"{weights.name} holds tensors that are not LoRA weights: {shown}"]
    return []


def check_lora_config(config: Mapping[str, Any], *, lora_name: str = "adapter") -> ServingCheck:
    problems = lora_config_problems(config)
    if problems:
        return ServingCheck(ok=False, problems=tuple(problems))
    ranks = [config["r"], *dict(config.get("rank_pattern") or {}).values()]
    rank = vllm_max_lora_rank(max(ranks))
    return ServingCheck(ok=True, vllm=VllmSettings(max_lora_rank=int(rank or 0), lora_name=lora_name))


def check_adapter_dir(adapter_dir: Path, *, lora_name: str = "adapter") -> ServingCheck:
    """The check on a saved adapter folder: its adapter_config.json and its weights' tensor names."""
    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return ServingCheck(ok=False, problems=(f"{ADAPTER_CONFIG} cannot be read: {err}",))
    if not isinstance(config, dict):
        return ServingCheck(ok=False, problems=(f"{ADAPTER_CONFIG} is not a JSON object",))
    check = check_lora_config(config, lora_name=lora_name)
    problems = [*check.problems, *tensor_problems(adapter_dir / ADAPTER_WEIGHTS)]
    if problems:
        return ServingCheck(ok=False, problems=tuple(problems))
    return check


def require_servable(adapter_dir: Path, *, lora_name: str = "adapter") -> ServingCheck:
    """`check_adapter_dir`, raising NotServable (every problem listed) when vLLM would refuse it."""
    check = check_adapter_dir(adapter_dir, lora_name=lora_name)
    if not check.ok:
        raise NotServable(f"the adapter in {adapter_dir}", list(check.problems))
    return check


def job_lora_problems(*, r: int, targets: list[str] | tuple[str, ...]) -> list[str]:
    """For a job about to train: would its adapter be servable? (checked before any weights load)."""
    return lora_config_problems(
        {"peft_type": "LORA", "r": r, "target_modules": list(targets), "bias": "none"}
    )
