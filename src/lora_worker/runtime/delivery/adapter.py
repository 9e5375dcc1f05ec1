"""The adapter as delivered: PEFT's format (adapter_config.json + adapter_model.safetensors) with the
tokenizer and its chat template, so a server formats prompts exactly as training did.

Ready to hand over as it is:
- the LoRA weights in bf16 (half of fp32: about 0.4 GB at r=16 on a 70B Llama; vLLM serves LoRA in
  the base model's dtype, bf16, anyway); fp32 only when asked for;
- `adapter_config.json` names the base model by its Hub id and commit (`base_model_name_or_path`,
  `revision`), never a folder on the worker's disk, so `AutoPeftModelForCausalLM` and vLLM find it;
- the base model's licence files beside it, where the base folder has them (see card.py).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lora_worker.runtime.delivery.card import copy_licence_files
from lora_worker.runtime.delivery.serving import ADAPTER_CONFIG
from lora_worker.runtime.files import atomic_write_json, fsync_dir, read_json

AdapterDtype = Literal["bf16", "fp32"]
TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}

# A snapshot in the Hugging Face hub cache layout: .../models--ORG--NAME/snapshots/<sha>
_HUB_CACHE_SNAPSHOT = re.compile(
    r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})/?$"
)


@dataclass(frozen=True)
class BaseIdentity:
    """The base model as a server will look it up: its Hub id and commit when known."""

    model_id: str  # Hub id (`org/name`), or the folder when the base has no Hub identity
    revision: str | None  # commit sha, when known
    path: Path | None = None  # the folder holding the base's files (its licence files are copied from it)


def base_identity(model_id: str, revision: str | None, path: Path | None) -> BaseIdentity:
    """The identity to record for a resolved base model (`ResolvedModel` or `ModelMeta` fields).

    A local folder that is a snapshot of the Hugging Face hub cache (`models--ORG--NAME/snapshots/<sha>`)
    still has a Hub identity: ORG/NAME at that commit.
    """
    if revision is None and path is not None:
        found = _HUB_CACHE_SNAPSHOT.search(Path(path).as_posix())
        if found:
            return BaseIdentity(f"{found['org']}/{found['name']}", found["sha"], Path(path))
    return BaseIdentity(model_id, revision, path)


def adapter_state_dict(model, dtype: AdapterDtype, weights: dict | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights of `model` (a PeftModel), cast to `dtype`, under PEFT's own parameter names
    (`weights`: the model's full state dict, gathered from the ranks of a sharded model)."""
    target = TORCH_DTYPES[dtype]
    named = weights.items() if weights is not None else model.named_parameters()
    return {
        name: p.detach().to(device="cpu", dtype=target).contiguous() for name, p in named if "lora_" in name
    }


def save_adapter(
    model,
    tokenizer,
    dest: Path,
    *,
    base: BaseIdentity | None = None,
    dtype: AdapterDtype = "bf16",
    weights: dict | None = None,
) -> Path:
    """Write the adapter to `dest` through a temporary folder renamed into place (never half-written).
    `weights`: as adapter_state_dict's.

    `base` names the base model in adapter_config.json and brings its licence files; the model
    card (README.md) is written later by `package_outputs`, once the report's numbers exist.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(
            tmp,
            safe_serialization=True,
            state_dict=adapter_state_dict(model, dtype, weights),
            # never look the base up on the Hub to guess whether the vocabulary was resized: it was not
            save_embedding_layers=False,
        )
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").unlink(
            missing_ok=True
        )  # PEFT's placeholder card; package_outputs writes the real one
        if base is not None:
            name_base(tmp / ADAPTER_CONFIG, base)
            if base.path is not None:
                copy_licence_files(base.path, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(dest.parent)
    return dest


def name_base(config_path: Path, base: BaseIdentity) -> None:
    """Set `base_model_name_or_path` and `revision` (PEFT's field for the base's commit) in place."""
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    config["base_model_name_or_path"] = base.model_id
    config["revision"] = base.revision
    atomic_write_json(config_path, config)
