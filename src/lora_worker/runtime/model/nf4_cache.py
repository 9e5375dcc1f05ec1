"""The base model's NF4 copy on the volume: saved once after the first 4-bit load, verified at every
later one.

Quantizing 70B from bf16 takes minutes at every cold start; loading a saved 4-bit copy reads ~40 GB
instead of ~141 GB and skips the quantization. The copy lives at
`<volume>/models/ORG--NAME/prequantized/<revision>--q<hash>/`, where the hash is taken from the one
quantization config the loader uses (`load.quantization_config().to_dict()`), so a changed setting
never loads a stale copy. It is written in shards (`max_shard_size`), and its `.complete` marker
records every file's size and SHA-256; a copy that fails verification is moved aside (kept, for a
look), never used, and the caller re-quantizes from the original weights.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import BitsAndBytesConfig

from lora_worker.runtime.files import tree_bytes
from lora_worker.runtime.model.layout import (
    HASH_WORKERS,
    marker_problem,
    ref_name,
    volume_model_dir,
    write_marker,
)
from lora_worker.runtime.model.load import quantization_config
from lora_worker.runtime.volume_lock import DEFAULT_STALE_LOCK_S, VolumeLock

logger = logging.getLogger(__name__)

# Shards of at most this size: a 70B NF4 copy is ~38 GB, so about 8 files that can be hashed (and
# loaded) in parallel, and a bad sector costs one shard's verification message, not a 38 GB blob.
DEFAULT_MAX_SHARD_SIZE = "5GB"

State = Literal["absent", "ok", "corrupt"]


@dataclass(frozen=True)
class Nf4Lookup:
    """What `find_prequantized` saw at `target`."""

    target: Path
    state: State
    problem: str | None = None  # why a copy that exists cannot be used

    @property
    def path(self) -> Path | None:
        """The verified copy to load, or None."""
        return self.target if self.state == "ok" else None


@dataclass(frozen=True)
class Nf4Use:
    """`use_prequantized`'s answer: the copy to load (or None), and a warning for the job's report
    when a corrupt copy was found and moved aside."""

    path: Path | None
    moved_to: Path | None = None
    warning: str | None = None


def quant_key(quant: BitsAndBytesConfig | dict[str, Any] | None = None) -> str:
    """Short hash of the quantization settings (default: the loader's own config)."""
    config = quantization_config() if quant is None else quant
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # default=str: to_dict() may hold dtypes or enums; their str() is stable across runs.
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def prequantized_dir(
    volume_dir: Path,
    model_id: str,
    revision: str | None,
    quant: BitsAndBytesConfig | dict[str, Any] | None = None,
) -> Path:
    """Where the NF4 copy of (model, revision, quantization settings) lives on the volume."""
    rev = ref_name(revision) if revision else "norev"
    return volume_model_dir(volume_dir, model_id) / "prequantized" / f"{rev}--q{quant_key(quant)}"


# --------------------------------------------------------------------------------------------------
# Looking (never changes anything)


def find_prequantized(
    volume_dir: Path,
    model_id: str,
    revision: str | None,
    quant: BitsAndBytesConfig | dict[str, Any] | None = None,
    *,
    hash_workers: int = HASH_WORKERS,
) -> Nf4Lookup:
    """Whether a usable NF4 copy exists: its marker lists every file, and every file has its listed
    size and SHA-256.

    Hashing costs about 0.75 s per GB on one core with SHA-NI (1.3 GB/s measured on the build
    machine's EPYC); shards are hashed in `hash_workers` threads at once, so for a 38 GB copy the
    time is bounded by how fast the volume reads (tens of seconds on a network volume), and those
    reads warm the page cache for the load that follows. Worth it: a copy with the right size and
    wrong bytes otherwise loads without complaint and trains to NaN.
    """
    target = prequantized_dir(volume_dir, model_id, revision, quant)
    return check_prequantized(target, hash_workers=hash_workers)


def check_prequantized(target: Path, *, hash_workers: int = HASH_WORKERS) -> Nf4Lookup:
    """`find_prequantized` for a known folder."""
    if not target.exists():
        return Nf4Lookup(target, "absent")
    problem = marker_problem(target, verify_checksums=True, hash_workers=hash_workers)
    if problem is None and not list(target.glob("*.safetensors")):
        problem = "it holds no *.safetensors"
    if problem is not None:
        return Nf4Lookup(target, "corrupt", problem)
    return Nf4Lookup(target, "ok")


# --------------------------------------------------------------------------------------------------
# Acting


def discard_prequantized(target: Path, reason: str) -> Path | None:
    """Move a bad copy aside to `<target>.corrupt-<UTC time>` (kept for a look; `prune` reclaims it)
    so the next load re-quantizes from the original weights. Returns where it went, or None when
    it was already gone (another worker moved it first)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = target.with_name(f"{target.name}.corrupt-{stamp}-{uuid.uuid4().hex[:6]}")
    try:
        os.replace(target, aside)
    except FileNotFoundError:
        return None
    logger.warning("moved the NF4 copy %s aside to %s: %s", target, aside.name, reason)
    return aside


def use_prequantized(
    volume_dir: Path,
    model_id: str,
    revision: str | None,
    quant: BitsAndBytesConfig | dict[str, Any] | None = None,
    *,
    hash_workers: int = HASH_WORKERS,
) -> Nf4Use:
    """The verified NF4 copy to load, or None; a copy that fails verification is moved aside and
    the answer's `warning` says so (for the job's warnings)."""
    found = find_prequantized(volume_dir, model_id, revision, quant, hash_workers=hash_workers)
    if found.state != "corrupt":
        return Nf4Use(found.path)
    moved = discard_prequantized(found.target, found.problem or "failed verification")
    where = f"moved aside to {moved}" if moved else "already moved aside by another worker"
    return Nf4Use(
        None,
        moved_to=moved,
        warning=f"the saved NF4 copy of the base model failed verification ({found.problem}); {where}; "
        "the model is quantized again from its original weights",
    )


def save_prequantized(
    model: Any,
    tokenizer: Any,
    target: Path,
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    stale_lock_s: float = DEFAULT_STALE_LOCK_S,
    hash_workers: int = HASH_WORKERS,
) -> Path:
    """Save a bitsandbytes-4bit model + tokenizer to `target` in safetensors shards, with a marker
    of every file's size and SHA-256; returns `target`.

    Written into a temporary folder beside `target` (marker included) and renamed into place under
    a lock, so readers see a complete copy or none. Call it right after loading, before the first
    forward: on CPU, bitsandbytes repacks 4-bit weights at the first forward and converting them back
    for saving rounds a quantization constant, so a copy saved afterwards is not bit-identical to what
    was loaded (GPUs do not repack).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with VolumeLock(
        target.parent / f".{target.name}.lock",
        stale_lock_s=stale_lock_s,
        purpose=f"prequantize {target.name}",
    ):
        existing = check_prequantized(target, hash_workers=hash_workers)
        if existing.state == "ok":
            return target  # another worker saved it meanwhile
        tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            _write_copy(model, tokenizer, tmp, max_shard_size=max_shard_size, hash_workers=hash_workers)
            if existing.state == "corrupt":
                discard_prequantized(target, existing.problem or "failed verification")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved the NF4 copy %s (%.2f GB)", target, tree_bytes(target) / 1e9)
    return target


def _write_copy(
    model: Any, tokenizer: Any, tmp: Path, *, max_shard_size: str | int, hash_workers: int
) -> None:
    model.save_pretrained(tmp, max_shard_size=max_shard_size)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(tmp)
    if not list(tmp.glob("*.safetensors")):
        raise OSError(f"save_pretrained wrote no *.safetensors into {tmp}")
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    write_marker(
        tmp,
        model_id=str(getattr(config, "_name_or_path", "")),
        revision=None,
        extra={"quantization": qc.to_dict() if hasattr(qc, "to_dict") else qc},
        checksums=True,
        hash_workers=hash_workers,
    )
