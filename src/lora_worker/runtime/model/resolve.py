"""Where the base model is: its config and tokenizer first, its weights later.

A job calls `resolve_model_meta` before it tokenizes (a few MB at most, never a weight file), and
`resolve_model_weights` only once it has decided to train, so a dry run or a bad dataset never
waits for (or pays for) a 140 GB download. Both look, in order, at:

1. `base_model` as an existing local directory: used as is;
2. RunPod's cached-model location `<volume>/huggingface-cache/hub/models--ORG--NAME/snapshots/<sha>/`
   (the Hugging Face hub cache layout RunPod fills when the endpoint's *Model* field is set); the
   snapshot named by `refs/<revision or main>` wins;
3. this project's cache `<volume>/models/ORG--NAME/<sha>/`, used only when its `.complete` marker
   is present and every listed file has its listed size;
4. the Hub: `resolve_model_meta` fetches the config and tokenizer into
   `<volume>/models/ORG--NAME/meta/<sha>/`; `resolve_model_weights` downloads the rest into (3)
   under a lock on the volume (see hub.py), reusing those small files.

Every folder is checked to be a causal LM that asks for no custom code. See docs/model-cache.md.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lora_worker.runtime.files import read_json
from lora_worker.runtime.model.download_progress import ProgressCallback
from lora_worker.runtime.model.hub import (
    DEFAULT_MIN_FREE_BYTES_MARGIN,
    HubAccess,
    fetch_meta,
    fetch_weights,
    meta_dir,
    plan_repo,
)
from lora_worker.runtime.model.layout import (
    MARKER_NAME,
    REPO_ID_RE,
    RUNPOD_CACHE_SUBDIR,
    SHA_RE,
    ModelResolutionError,
    complete_snapshot,
    marker_problem,
    model_dir_problem,
    record_ref,
    require_usable,
    volume_model_dir,
    volume_ref,
)
from lora_worker.runtime.volume_lock import DEFAULT_LOCK_TIMEOUT_S, DEFAULT_STALE_LOCK_S

logger = logging.getLogger(__name__)

Source = Literal["local_dir", "runpod_cache", "volume_cache", "downloaded"]
MetaSource = Literal["local_dir", "runpod_cache", "volume_cache", "hub"]
WEIGHTS_PRESENT: frozenset[str] = frozenset({"local_dir", "runpod_cache", "volume_cache"})


@dataclass(frozen=True)
class ModelMeta:
    """The base model's identity, config and tokenizer: everything a job needs before its weights."""

    model_id: str
    """Hub id (`org/name`), or the absolute path for a local directory."""
    revision: str | None
    """Commit sha when known (None for a local directory)."""
    source: MetaSource
    """Where the weights are: `local_dir`, `runpod_cache`, `volume_cache` (all present), or `hub`
    (config and tokenizer fetched; the weights are still to download)."""
    path: Path
    """Directory holding config.json and the tokenizer files (and the weights, unless `hub`)."""
    config: dict[str, Any]
    """Parsed config.json."""
    download_bytes: int | None = None
    """Bytes `resolve_model_weights` would fetch from the Hub (None when the weights are present
    or the size is unknown)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: `meta` (this call)."""

    @property
    def weights_present(self) -> bool:
        return self.source in WEIGHTS_PRESENT


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    """Directory with config.json, the tokenizer and *.safetensors."""
    source: Source
    model_id: str
    """Hub id (`org/name`), or the absolute path for a local directory."""
    revision: str | None
    """Commit sha when known."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: `resolve` (the whole call), `download` (0 when nothing was fetched), `lock_wait`."""
    downloaded_bytes: int = 0


# --------------------------------------------------------------------------------------------------
# Config and tokenizer


def resolve_model_meta(
    base_model: str,
    *,
    revision: str | None = None,
    volume_dir: Path,
    hf_token: str | None,
    hf_endpoint: str | None = None,
) -> ModelMeta:
    """The base model's config and tokenizer, downloading only those (never a weight file).

    Raises ModelResolutionError for problems the endpoint owner must fix (not a directory or Hub
    id, unknown id, gated without token, not a causal LM, custom code, no safetensors), and
    DiskSpaceError (an OSError) when even the small files do not fit on the volume.
    """
    t0 = time.monotonic()
    meta = _find_meta(base_model, revision, Path(volume_dir), HubAccess.of(hf_endpoint, hf_token))
    meta = _with_timing(meta, "meta", time.monotonic() - t0)
    logger.info("base model %s: config from %s (%s)", meta.model_id, meta.path, meta.source)
    return meta


def _find_meta(base_model: str, revision: str | None, volume_dir: Path, access: HubAccess) -> ModelMeta:
    local = Path(base_model).expanduser()
    if local.is_dir():
        local = local.resolve()
        config = require_usable(local, f"local directory {local}")
        return ModelMeta(str(local), None, "local_dir", local, config)
    if _looks_like_path(base_model) or not REPO_ID_RE.match(base_model):
        raise ModelResolutionError(
            f"base_model {base_model!r} is neither an existing directory nor a Hugging Face model id of the form ORG/NAME"
        )
    found = _present_on_volume(base_model, revision, volume_dir)
    if found is not None:
        return found
    model_dir = volume_model_dir(volume_dir, base_model)
    sha = volume_ref(model_dir, revision)
    if sha is not None and (meta_dir(volume_dir, base_model, sha) / MARKER_NAME).is_file():
        known = _meta_from_dir(base_model, sha, meta_dir(volume_dir, base_model, sha))
        if known is not None:
            return known
    plan = plan_repo(base_model, revision, access)
    snap = complete_snapshot(model_dir, plan.sha)
    if snap is not None:  # complete under its sha, but no ref for this revision name yet
        record_ref(model_dir, revision, plan.sha)
        return ModelMeta(base_model, plan.sha, "volume_cache", snap, require_usable(snap, base_model))
    path = fetch_meta(plan, volume_dir=volume_dir, access=access)
    record_ref(model_dir, revision, plan.sha)
    config = require_usable(path, base_model, weights=False)
    return ModelMeta(base_model, plan.sha, "hub", path, config, download_bytes=plan.total_bytes)


def _present_on_volume(model_id: str, revision: str | None, volume_dir: Path) -> ModelMeta | None:
    """The model when its weights are already on the volume: RunPod's cache, then this project's."""
    found = _find_runpod_snapshot(volume_dir, model_id, revision)
    if found is not None:
        snap, sha = found
        return ModelMeta(model_id, sha, "runpod_cache", snap, require_usable(snap, model_id))
    model_dir = volume_model_dir(volume_dir, model_id)
    snap = complete_snapshot(model_dir, volume_ref(model_dir, revision))
    if snap is not None:
        return ModelMeta(model_id, snap.name, "volume_cache", snap, require_usable(snap, model_id))
    return None


def _meta_from_dir(model_id: str, sha: str, directory: Path) -> ModelMeta | None:
    """A config/tokenizer folder fetched earlier, when it still checks out (sizes and checksums)."""
    problem = marker_problem(directory, verify_checksums=True)
    if problem is not None:
        logger.warning("not using %s: %s", directory, problem)
        return None
    marker = read_json(directory / MARKER_NAME) or {}
    plan = marker.get("plan") if isinstance(marker.get("plan"), dict) else {}
    total = sum(int(v) for v in plan.values() if isinstance(v, int)) or None
    config = require_usable(directory, model_id, weights=False)
    return ModelMeta(model_id, sha, "hub", directory, config, download_bytes=total)


# --------------------------------------------------------------------------------------------------
# Weights


def resolve_model_weights(
    meta: ModelMeta,
    *,
    volume_dir: Path,
    hf_token: str | None,
    hf_endpoint: str | None = None,
    on_progress: ProgressCallback | None = None,
    min_free_bytes_margin: int = DEFAULT_MIN_FREE_BYTES_MARGIN,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    stale_lock_s: float = DEFAULT_STALE_LOCK_S,
) -> ResolvedModel:
    """The full model folder (config, tokenizer, *.safetensors) of the commit `meta` names,
    downloading the weights to the volume under a lock when they are not there yet.

    Raises ModelResolutionError, DiskSpaceError (an OSError) when the
    download does not fit, LockTimeoutError when another live worker holds the model's lock for
    longer than `lock_timeout_s` seconds.
    """
    t0 = time.monotonic()
    present = _still_present(meta, Path(volume_dir))
    if present is not None:
        return _resolved(present, meta.source, meta, {}, 0, t0)  # type: ignore[arg-type]
    if meta.revision is None:
        raise ModelResolutionError(
            f"{meta.model_id}: no commit known for its weights; resolve its config first"
        )
    access = HubAccess.of(hf_endpoint, hf_token)
    plan = plan_repo(meta.model_id, meta.revision, access)  # pinned to the commit whose config was read
    got = fetch_weights(
        plan,
        volume_dir=Path(volume_dir),
        access=access,
        on_progress=on_progress,
        min_free_bytes_margin=min_free_bytes_margin,
        lock_timeout_s=lock_timeout_s,
        stale_lock_s=stale_lock_s,
    )
    require_usable(got.path, meta.model_id)
    source: Source = "downloaded" if got.fetched else "volume_cache"
    return _resolved(got.path, source, meta, got.timings, got.downloaded_bytes, t0)


def _still_present(meta: ModelMeta, volume_dir: Path) -> Path | None:
    """`meta.path` when it holds the weights and still checks out; None when they must be fetched."""
    if meta.source in ("local_dir", "runpod_cache"):
        problem = model_dir_problem(meta.path)
        if problem is not None:
            raise ModelResolutionError(f"{meta.path} cannot be used as the base model: {problem}")
        return meta.path
    if meta.source == "volume_cache":
        return complete_snapshot(meta.path.parent, meta.path.name)
    return None


def _resolved(
    path: Path, source: Source, meta: ModelMeta, timings: dict[str, float], nbytes: int, t0: float
) -> ResolvedModel:
    t = {"download": 0.0, **timings, "resolve": round(time.monotonic() - t0, 3)}
    logger.info("base model %s -> %s (%s, %.1f s)", meta.model_id, path, source, t["resolve"])
    return ResolvedModel(
        path=path,
        source=source,
        model_id=meta.model_id,
        revision=meta.revision,
        timings=t,
        downloaded_bytes=nbytes,
    )


def resolve_base_model(
    base_model: str,
    *,
    volume_dir: Path,
    hf_token: str | None,
    hf_endpoint: str | None = None,
    revision: str | None = None,
    on_progress: ProgressCallback | None = None,
    min_free_bytes_margin: int = DEFAULT_MIN_FREE_BYTES_MARGIN,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    stale_lock_s: float = DEFAULT_STALE_LOCK_S,
) -> ResolvedModel:
    """`resolve_model_meta` then `resolve_model_weights`: the whole model in one call (the
    `fetch-model` command). `timings["resolve"]` covers both."""
    t0 = time.monotonic()
    meta = resolve_model_meta(
        base_model, revision=revision, volume_dir=volume_dir, hf_token=hf_token, hf_endpoint=hf_endpoint
    )
    resolved = resolve_model_weights(
        meta,
        volume_dir=volume_dir,
        hf_token=hf_token,
        hf_endpoint=hf_endpoint,
        on_progress=on_progress,
        min_free_bytes_margin=min_free_bytes_margin,
        lock_timeout_s=lock_timeout_s,
        stale_lock_s=stale_lock_s,
    )
    timings = {**resolved.timings, "resolve": round(time.monotonic() - t0, 3)}
    return ResolvedModel(
        path=resolved.path,
        source=resolved.source,
        model_id=resolved.model_id,
        revision=resolved.revision,
        timings=timings,
        downloaded_bytes=resolved.downloaded_bytes,
    )


# --------------------------------------------------------------------------------------------------
# Lookups


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~"))
        or value.count("/") > 1
        or (os.sep != "/" and os.sep in value)
    )


def _with_timing(meta: ModelMeta, key: str, seconds: float) -> ModelMeta:
    return replace(meta, timings={**meta.timings, key: round(seconds, 3)})


def _find_runpod_snapshot(volume_dir: Path, model_id: str, revision: str | None) -> tuple[Path, str] | None:
    """The complete snapshot RunPod cached for this model, as (path, sha), or None."""
    repo = Path(volume_dir) / RUNPOD_CACHE_SUBDIR / f"models--{model_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    if revision and SHA_RE.match(revision):
        candidates = [snapshots / revision]
    else:
        ref = repo / "refs" / (revision or "main")
        if ref.is_file():
            candidates = [snapshots / ref.read_text().strip()]
        elif revision is None:  # no refs/main: newest snapshot first
            candidates = sorted(
                (p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True
            )
        else:
            return None
    for snap in candidates:
        if not snap.is_dir():
            continue
        problem = model_dir_problem(snap)
        if problem is None:
            return snap, snap.name
        logger.warning("ignoring RunPod cached snapshot %s: %s", snap, problem)
    return None
