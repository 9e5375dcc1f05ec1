"""Where model files live on the volume, which files a job needs, and how a folder proves complete.

Every folder the worker fills (a download, the config/tokenizer-only copy, the NF4 copy) is used
only when its `.complete` marker, written last, lists every file with its size (and, for the NF4
copy and the config/tokenizer folder, its SHA-256) and the folder still matches it. A branch or
tag name points at a commit through `refs/<name>`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lora_worker.runtime.files import atomic_write_json, atomic_write_text, read_json, sha256_file

logger = logging.getLogger(__name__)

# What a training job needs from a model repo: config, tokenizer and safetensors weights. The original
# Meta checkpoint (`original/*.pth`, another ~140 GB for 70B) and PyTorch pickles are never fetched.
META_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json")
ALLOW_PATTERNS: tuple[str, ...] = META_PATTERNS + WEIGHT_PATTERNS
IGNORE_PATTERNS: tuple[str, ...] = ("original/*", "*.pth", "*.bin", "*.pt")
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

MARKER_NAME = ".complete"
RUNPOD_CACHE_SUBDIR = Path("huggingface-cache") / "hub"
VOLUME_CACHE_SUBDIR = Path("models")
META_SUBDIR = "meta"  # <volume>/models/ORG--NAME/meta/<sha>/: config and tokenizer only

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Threads hashing files at once: hashlib releases the GIL, and the volume serves parallel reads faster
# than one stream.
HASH_WORKERS = min(8, os.cpu_count() or 1)


class ModelResolutionError(ValueError):
    """The base model cannot be used or fetched; the message says why and what to change."""


# --------------------------------------------------------------------------------------------------
# Names and paths


def model_key(model_id: str) -> str:
    """Directory name for a model: `org--name` for Hub ids, `local--<basename>-<hash>` for paths."""
    if REPO_ID_RE.match(model_id):
        return model_id.replace("/", "--")
    digest = hashlib.sha256(str(Path(model_id).expanduser().absolute()).encode()).hexdigest()[:10]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(model_id).name) or "model"
    return f"local--{base}-{digest}"


def volume_model_dir(volume_dir: Path, model_id: str) -> Path:
    return Path(volume_dir) / VOLUME_CACHE_SUBDIR / model_key(model_id)


def ref_name(revision: str | None) -> str:
    """A branch or tag name made safe as a file name (`main` when None)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", revision or "main")


def is_wanted(name: str) -> bool:
    if any(fnmatch.fnmatchcase(name, pat) for pat in IGNORE_PATTERNS):
        return False
    return any(fnmatch.fnmatchcase(name, pat) for pat in ALLOW_PATTERNS)


def is_meta_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in META_PATTERNS)


# --------------------------------------------------------------------------------------------------
# Completion markers


def listing(root: Path) -> dict[str, int]:
    """Relative posix path -> size for every regular file under `root`, hidden dirs/files skipped."""
    out: dict[str, int] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file():  # follows symlinks, as in the hub cache's snapshots -> blobs
            out[rel.as_posix()] = p.stat().st_size
    return out


def hash_files(root: Path, names: Iterable[str], *, workers: int = HASH_WORKERS) -> dict[str, str]:
    """name -> hex SHA-256 of `root/name`, several files at once (hashlib releases the GIL)."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = pool.map(lambda n: sha256_file(root / n), names)
        return dict(zip(names, digests, strict=True))


def write_marker(
    directory: Path,
    *,
    model_id: str,
    revision: str | None,
    extra: dict[str, Any] | None = None,
    checksums: bool = False,
    hash_workers: int = HASH_WORKERS,
) -> dict[str, Any]:
    """Write `.complete` listing every file's size (and SHA-256 with `checksums`); returns it."""
    files = listing(directory)
    marker: dict[str, Any] = {
        "model_id": model_id,
        "revision": revision,
        "files": files,
        "total_bytes": sum(files.values()),
        "completed_at": time.time(),
        **(extra or {}),
    }
    if checksums:
        marker["sha256"] = hash_files(directory, files, workers=hash_workers)
    atomic_write_json(directory / MARKER_NAME, marker, indent=1, sort_keys=True)
    return marker


def marker_problem(
    directory: Path, *, verify_checksums: bool = False, hash_workers: int = HASH_WORKERS
) -> str | None:
    """None when `directory` has a marker and every file it lists has its listed size (and, with
    `verify_checksums`, its listed SHA-256, which the marker must then hold for every file)."""
    marker = read_json(directory / MARKER_NAME)
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return "no .complete marker"
    files: dict[str, Any] = marker["files"]
    for name, size in files.items():
        try:
            actual = (directory / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual} bytes, the marker says {size}"
    if not verify_checksums:
        return None
    listed = marker.get("sha256")
    if not isinstance(listed, dict) or set(listed) != set(files):
        return "the .complete marker records no SHA-256 for some files (written by an older worker)"
    actual_sums = hash_files(directory, files, workers=hash_workers)
    bad = sorted(n for n in files if actual_sums[n] != listed[n])
    if bad:
        return f"SHA-256 mismatch in {', '.join(bad[:5])} (same size, different bytes)"
    return None


# --------------------------------------------------------------------------------------------------
# Refs and complete snapshots


def record_ref(model_dir: Path, revision: str | None, sha: str) -> None:
    """`refs/<branch or tag>` -> sha, so later jobs find this commit without asking the Hub."""
    if revision is not None and SHA_RE.match(revision):
        return
    (model_dir / "refs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(model_dir / "refs" / ref_name(revision), sha)


def volume_ref(model_dir: Path, revision: str | None) -> str | None:
    """The commit sha a revision names on the volume: itself when it is a sha, else `refs/<name>`."""
    if revision and SHA_RE.match(revision):
        return revision
    try:
        sha = (model_dir / "refs" / ref_name(revision)).read_text().strip()
    except OSError:
        return None
    return sha if SHA_RE.match(sha) else None


def complete_snapshot(model_dir: Path, sha: str | None) -> Path | None:
    """`<model_dir>/<sha>/` when its marker checks out (sizes), else None (logged)."""
    if not sha:
        return None
    snap = model_dir / sha
    if not snap.is_dir():
        return None
    problem = marker_problem(snap)
    if problem is None:
        return snap
    logger.warning("not using %s: %s", snap, problem)
    return None


# --------------------------------------------------------------------------------------------------
# What a folder holds


def config_of(directory: Path) -> dict[str, Any]:
    config = read_json(directory / "config.json")
    return config if isinstance(config, dict) else {}


def meta_dir_problem(directory: Path) -> str | None:
    """Why `directory` lacks the config and tokenizer a job reads before its weights, or None."""
    if not (directory / "config.json").is_file():
        return "it has no config.json"
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return f"it has no tokenizer ({' / '.join(TOKENIZER_FILES)})"
    return None


def model_dir_problem(directory: Path) -> str | None:
    """Why `directory` is not a loadable causal-LM checkpoint for the worker, or None."""
    if not (directory / "config.json").is_file():
        return "it has no config.json"
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pth")]
        if pickles:
            return f"it has only PyTorch pickle weights ({', '.join(sorted(pickles)[:3])}); the worker loads *.safetensors"
        return "it has no *.safetensors weights"
    for index_path in directory.glob("*.safetensors.index.json"):
        index = read_json(index_path) or {}
        shards = set((index.get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            return f"{index_path.name} lists shards that are missing: {', '.join(missing[:5])}"
    return meta_dir_problem(directory)


def check_causal_lm(config: dict[str, Any], what: str) -> None:
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        kind = (
            ", ".join(map(str, archs))
            if archs
            else f"no architectures listed (model_type {config.get('model_type')!r})"
        )
        raise ModelResolutionError(
            f"{what} is not a causal language model: its config.json says {kind}. "
            "The worker fine-tunes *ForCausalLM models such as LlamaForCausalLM (meta-llama/Meta-Llama-3-70B-Instruct)."
        )


def custom_code_problem(directory: Path) -> str | None:
    """Which file asks to run the folder's own Python code (an `auto_map` entry), or None.

    The worker never runs code from a model repository; transformers with trust_remote_code=False
    would either refuse or quietly load a stock class in place of the custom one, so a folder that
    asks for custom code is refused outright, before anything reads it.
    """
    for name in ("config.json", "tokenizer_config.json"):
        data = read_json(directory / name)
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            refs = sorted({str(v) for value in auto_map.values() for v in _as_list(value) if v})
            return f"its {name} names custom code to run ({', '.join(refs[:3])} in auto_map)"
    return None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def require_no_custom_code(directory: Path, what: str) -> None:
    problem = custom_code_problem(directory)
    if problem:
        raise ModelResolutionError(
            f"{what} cannot be used as the base model: {problem}. The worker never runs code from a model "
            "repository (trust_remote_code=False); use a model whose architecture and tokenizer ship with "
            "transformers, such as meta-llama/Meta-Llama-3-70B-Instruct"
        )


def require_usable(directory: Path, what: str, *, weights: bool = True) -> dict[str, Any]:
    """The folder's parsed config.json, after checking it is a complete causal LM without custom
    code (`weights=False`: config and tokenizer only); ModelResolutionError otherwise."""
    problem = model_dir_problem(directory) if weights else meta_dir_problem(directory)
    if problem:
        raise ModelResolutionError(f"{what} cannot be used as the base model: {problem}")
    require_no_custom_code(directory, what)
    config = config_of(directory)
    check_causal_lm(config, what)
    return config
