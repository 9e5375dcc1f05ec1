"""The adapter as delivered: PEFT's format (adapter_config.json + adapter_model.safetensors) with the
tokenizer and its chat template, so a server formats prompts exactly as training did."""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_worker.runtime.files import fsync_dir


def save_adapter(model, tokenizer, dest: Path) -> Path:
    """Write the adapter to `dest` through a temporary folder renamed into place (never half-written)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(dest.parent)
    return dest
