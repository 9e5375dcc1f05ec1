"""Fetching a model from the Hugging Face Hub onto the volume: config and tokenizer first, weights later.

`plan_repo` asks the Hub once (`model_info`) and fails early, with a message the endpoint owner can
act on, for an unknown id, a gated model without a token, a model that is not a causal LM or one
without safetensors weights; it fetches no file. `fetch_meta` then downloads only the small files
(config, generation config, tokenizer, chat template) into `<volume>/models/ORG--NAME/meta/<sha>/`,
and `fetch_weights` downloads the rest under a lock on the volume into `.<sha>.partial/`, reusing
those small files, renamed to `<sha>/` when complete with its `.complete` marker written last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lora_worker.runtime.files import require_free_space
from lora_worker.runtime.model.download_progress import (
    DownloadProgress,
    ProgressCallback,
    WaiterProgress,
    partial_state,
)
from lora_worker.runtime.model.layout import (
    MARKER_NAME,
    META_SUBDIR,
    RUNPOD_CACHE_SUBDIR,
    SHA_RE,
    ModelResolutionError,
    check_causal_lm,
    complete_snapshot,
    config_of,
    is_meta_file,
    is_wanted,
    listing,
    marker_problem,
    volume_model_dir,
    write_marker,
)
from lora_worker.runtime.volume_lock import DEFAULT_LOCK_TIMEOUT_S, DEFAULT_STALE_LOCK_S, VolumeLock

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_MIN_FREE_BYTES_MARGIN = 5 * 1024**3  # room left for logs, checkpoints and the adapter


@dataclass(frozen=True)
class HubAccess:
    endpoint: str
    token: str | None

    @classmethod
    def of(cls, hf_endpoint: str | None, hf_token: str | None) -> HubAccess:
        return cls((hf_endpoint or DEFAULT_ENDPOINT).rstrip("/"), hf_token or None)

    @property
    def client_token(self) -> str | bool:
        return self.token or False  # False: never fall back to a token from env or ~/.cache


@dataclass(frozen=True)
class RepoPlan:
    model_id: str
    sha: str
    files: dict[str, int | None] = field(default_factory=dict)
    """Files to fetch (after allow/ignore filtering) -> size in bytes when the Hub reported it."""

    @property
    def meta_files(self) -> dict[str, int | None]:
        return {n: s for n, s in self.files.items() if is_meta_file(n)}

    @property
    def total_bytes(self) -> int:
        return sum(s or 0 for s in self.files.values())


@dataclass(frozen=True)
class Downloaded:
    path: Path
    fetched: bool  # False: another worker had finished it meanwhile
    downloaded_bytes: int
    timings: dict[str, float]


# --------------------------------------------------------------------------------------------------
# Errors the endpoint owner can act on


def licence_url(model_id: str) -> str:
    return f"https://huggingface.co/{model_id}"


def gated_error(model_id: str, hf_token: str | None) -> ModelResolutionError:
    if hf_token:
        return ModelResolutionError(
            f"{model_id} is a gated model and the HF_TOKEN set on the endpoint has not been granted access: "
            f"accept the model's licence at {licence_url(model_id)} with the account that owns the token, "
            "or set the HF_TOKEN env var on the endpoint to a token that has accepted it"
        )
    return ModelResolutionError(
        f"{model_id} is a gated model and no Hugging Face token is set: set the HF_TOKEN env var on the endpoint "
        f"to a token that has accepted the model's licence at {licence_url(model_id)}"
    )


def hub_error(exc: Exception, model_id: str, revision: str | None, access: HubAccess) -> Exception:
    """A ModelResolutionError for huggingface_hub errors with a known cause; `exc` itself otherwise."""
    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return gated_error(model_id, access.token)
    if isinstance(exc, RepositoryNotFoundError):
        hint = (
            "the HF_TOKEN set on the endpoint has no access to it"
            if access.token
            else "if it is private, set the HF_TOKEN env var on the endpoint to a token with access"
        )
        return ModelResolutionError(
            f"model {model_id!r} was not found on the Hugging Face Hub ({access.endpoint}); check the id for typos ({hint})"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelResolutionError(f"revision {revision!r} of {model_id} does not exist on the Hub")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return ModelResolutionError(
            f"the Hub refused access to {model_id} (HTTP {status}): check that the HF_TOKEN env var on the "
            f"endpoint is a valid token that has accepted the model's licence at {licence_url(model_id)}"
        )
    return exc


def _raise_mapped(exc: Exception, model_id: str, revision: str | None, access: HubAccess) -> None:
    mapped = hub_error(exc, model_id, revision, access)
    if mapped is exc:
        raise exc
    raise mapped from exc


# --------------------------------------------------------------------------------------------------
# Pre-flight


def plan_repo(model_id: str, revision: str | None, access: HubAccess) -> RepoPlan:
    """Existence, access, causal-LM check (from the Hub's config summary), commit sha, file list and
    sizes, from one `model_info` call. Fetches no file."""
    api = HfApi(endpoint=access.endpoint, token=access.client_token)
    try:
        info = api.model_info(model_id, revision=revision, files_metadata=True)
    except Exception as e:
        _raise_mapped(e, model_id, revision, access)
    if info.gated and not access.token:
        raise gated_error(model_id, access.token)
    if isinstance(info.config, dict) and info.config.get("architectures"):
        # The Hub summarizes config.json in model_info; the file itself is checked again once fetched.
        check_causal_lm(info.config, model_id)
    sha = info.sha or (revision if revision and SHA_RE.match(revision) else None)
    if not sha:
        raise ModelResolutionError(
            f"the Hub did not report a commit sha for {model_id} at {revision or 'main'}"
        )
    siblings = info.siblings or []
    files = {
        s.rfilename: (s.lfs.size if s.lfs is not None else s.size) for s in siblings if is_wanted(s.rfilename)
    }
    if "config.json" not in files:
        raise ModelResolutionError(
            f"{model_id} has no config.json on the Hub; it is not a transformers model"
        )
    if not any(n.endswith(".safetensors") for n in files):
        others = [s.rfilename for s in siblings if s.rfilename.endswith((".bin", ".pth", ".pt", ".gguf"))][:3]
        raise ModelResolutionError(
            f"{model_id} has no *.safetensors weights on the Hub"
            + (f" (only {', '.join(others)})" if others else "")
            + "; the worker loads safetensors checkpoints only"
        )
    return RepoPlan(model_id=model_id, sha=sha, files=files)


# --------------------------------------------------------------------------------------------------
# Config and tokenizer only


def meta_dir(volume_dir: Path, model_id: str, sha: str) -> Path:
    return volume_model_dir(volume_dir, model_id) / META_SUBDIR / sha


def fetch_meta(plan: RepoPlan, *, volume_dir: Path, access: HubAccess) -> Path:
    """Download config, generation config and tokenizer files (never a weight file) into
    `meta/<sha>/`; returns that folder. Not under the download lock: it must not wait behind
    another worker's 140 GB download; two workers fetching it at once each write a private temp
    folder and the first rename wins."""
    target = meta_dir(volume_dir, plan.model_id, plan.sha)
    if _meta_ok(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    need = sum(s or 0 for s in plan.meta_files.values())
    require_free_space(target.parent, need, f"the config and tokenizer of {plan.model_id}")
    tmp = target.parent / f".{plan.sha}.partial-{uuid.uuid4().hex[:8]}"
    try:
        for name in sorted(plan.meta_files, key=lambda n: (n != "config.json", n)):
            _hub_file(plan, name, tmp, volume_dir=volume_dir, access=access)
            if name == "config.json":
                check_causal_lm(config_of(tmp), plan.model_id)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # hf_hub_download's per-file metadata
        # The marker goes in before the rename, so `target` appears complete or not at all.
        write_marker(
            tmp, model_id=plan.model_id, revision=plan.sha, extra={"plan": plan.files}, checksums=True
        )
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _meta_ok(target: Path) -> bool:
    # Checksums too: these files are a few MB, and a corrupt tokenizer would silently mistokenize.
    return target.is_dir() and marker_problem(target, verify_checksums=True) is None


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place; a peer's finished copy already there wins, a broken
    one (only a crash or a hand edit leaves it) is moved out of the way first."""
    if target.exists() and not _meta_ok(target):
        aside = target.with_name(f".{target.name}.broken-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not _meta_ok(target):
            raise  # not a peer's finished copy: a real failure


def _hub_file(
    plan: RepoPlan,
    name: str,
    local_dir: Path,
    *,
    volume_dir: Path,
    access: HubAccess,
    tqdm_class: type | None = None,
) -> Path:
    """One file of the plan's commit into `local_dir`, size-checked against the Hub's listing."""
    try:
        path = Path(
            hf_hub_download(
                plan.model_id,
                name,
                revision=plan.sha,
                local_dir=local_dir,
                # read-only lookup: a file RunPod already cached is copied, not re-downloaded
                cache_dir=Path(volume_dir) / RUNPOD_CACHE_SUBDIR,
                endpoint=access.endpoint,
                token=access.client_token,
                tqdm_class=tqdm_class,  # type: ignore[arg-type]
            )
        )
    except Exception as e:
        _raise_mapped(e, plan.model_id, plan.sha, access)
    expected = plan.files.get(name)
    size = path.stat().st_size
    if expected is not None and size != expected:
        path.unlink(missing_ok=True)
        raise OSError(f"downloaded {name} is {size} bytes, the Hub listed {expected}")
    return path


# --------------------------------------------------------------------------------------------------
# Weights


def fetch_weights(
    plan: RepoPlan,
    *,
    volume_dir: Path,
    access: HubAccess,
    on_progress: ProgressCallback | None = None,
    min_free_bytes_margin: int = DEFAULT_MIN_FREE_BYTES_MARGIN,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    stale_lock_s: float = DEFAULT_STALE_LOCK_S,
) -> Downloaded:
    """The complete `<sha>/` folder, downloaded under the model's lock unless another worker
    finished it first."""
    model_dir = volume_model_dir(volume_dir, plan.model_id)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".{plan.sha}.partial"
    lock = VolumeLock(
        model_dir / ".download.lock",
        timeout_s=lock_timeout_s,
        stale_lock_s=stale_lock_s,
        purpose=f"download {plan.model_id}@{plan.sha}",
        on_wait=WaiterProgress(on_progress, tmp, plan.files),
    )
    with lock:
        timings = {"lock_wait": round(lock.waited_s, 3)}
        done = complete_snapshot(model_dir, plan.sha)
        if done is None:
            fetched, seconds = _download_locked(
                plan,
                model_dir,
                volume_dir=volume_dir,
                access=access,
                on_progress=on_progress,
                margin=min_free_bytes_margin,
            )
            timings["download"] = seconds
    if done is not None:  # another worker finished it while we waited
        return Downloaded(model_dir / plan.sha, fetched=False, downloaded_bytes=0, timings=timings)
    return Downloaded(model_dir / plan.sha, fetched=True, downloaded_bytes=fetched, timings=timings)


def _download_locked(
    plan: RepoPlan,
    model_dir: Path,
    *,
    volume_dir: Path,
    access: HubAccess,
    on_progress: ProgressCallback | None,
    margin: int,
) -> tuple[int, float]:
    """Resume or start `.<sha>.partial/`, fetch what is missing, rename it into place, write the
    marker. Returns (bytes fetched, seconds). Runs under the model's lock."""
    final, tmp = model_dir / plan.sha, model_dir / f".{plan.sha}.partial"
    if final.exists() and (final / MARKER_NAME).exists():
        logger.warning("%s failed verification (%s); downloading it again", final, marker_problem(final))
        shutil.rmtree(final, ignore_errors=True)
    fresh = not tmp.exists() and not final.exists()
    _prepare_partial(final, tmp, plan.files)
    already = _finished(tmp, plan.files)
    seedable = _seedable_from_meta(tmp, plan, volume_dir)
    need = sum(
        (size or 0) for name, size in plan.files.items() if name not in already and name not in seedable
    )
    try:
        require_free_space(model_dir, need, f"the download of {plan.model_id}", margin_bytes=margin)
    except OSError:
        if fresh:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _seed(tmp, seedable)
    already = _finished(tmp, plan.files)
    t0 = time.monotonic()
    try:
        fetched = _fetch_missing(
            plan, tmp, already, volume_dir=volume_dir, access=access, on_progress=on_progress
        )
    except Exception:
        if tmp.is_dir() and not listing(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # nothing finished: leave no empty partial dir behind
        raise
    seconds = round(time.monotonic() - t0, 3)
    shutil.rmtree(
        tmp / ".cache", ignore_errors=True
    )  # hf_hub_download's per-file metadata; the marker replaces it
    os.replace(tmp, final)
    write_marker(
        final,
        model_id=plan.model_id,
        revision=plan.sha,
        extra={"source": "downloaded", "endpoint": access.endpoint},
    )
    return fetched, seconds


def _fetch_missing(
    plan: RepoPlan,
    tmp: Path,
    already: dict[str, int],
    *,
    volume_dir: Path,
    access: HubAccess,
    on_progress: ProgressCallback | None,
) -> int:
    """Download every planned file not in `already`, config.json first (the causal-LM check runs
    before any weight byte is fetched), then by increasing size; returns bytes fetched."""
    order = sorted(plan.files, key=lambda n: (n != "config.json", plan.files[n] or 0, n))
    progress = DownloadProgress(on_progress, plan.files)
    progress.completed_bytes = sum(already.values())
    progress.files_done = len(already)
    with progress:
        progress.emit(force=True)
        counter = progress.tqdm_class()
        for name in order:
            if name in already:
                continue
            path = _hub_file(plan, name, tmp, volume_dir=volume_dir, access=access, tqdm_class=counter)
            progress.file_done(path.stat().st_size)
            if name == "config.json":
                try:
                    check_causal_lm(config_of(tmp), plan.model_id)
                except ModelResolutionError:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        progress.emit(force=True)
    return progress.fetched


def _finished(tmp: Path, files: dict[str, int | None]) -> dict[str, int]:
    """Files in the partial dir that need no request: present under their final name (written by a
    rename, so whole) with the listed size, or recorded by hf_hub_download when the size is unknown."""
    done, _ = partial_state(tmp, files)
    return done


def _prepare_partial(final: Path, tmp: Path, files: dict[str, int | None]) -> None:
    """Make `tmp` a clean place to resume into: adopt an unmarked final dir, drop partial/stray files."""
    if final.exists():
        # Renamed but killed before the marker: treat it as a partial download.
        if tmp.exists():
            shutil.rmtree(final, ignore_errors=True)
        else:
            os.replace(final, tmp)
        logger.warning("%s had no valid .complete marker; resuming it as a partial download", final)
    if not tmp.exists():
        tmp.mkdir(parents=True)
        return
    logger.warning("resuming the partial download left in %s", tmp)
    dl = tmp / ".cache" / "huggingface" / "download"
    if dl.is_dir():  # a killed hf_hub_download leaves uniquely named *.incomplete files nobody will reuse
        for p in dl.rglob("*.incomplete"):
            p.unlink(missing_ok=True)
    for name, actual in listing(tmp).items():
        expected = files.get(name, -1)
        if expected == -1 or (expected is not None and expected != actual):
            (tmp / name).unlink(missing_ok=True)


def _seedable_from_meta(tmp: Path, plan: RepoPlan, volume_dir: Path) -> dict[str, Path]:
    """name -> file in `meta/<sha>/` for the config and tokenizer files `fetch_meta` already
    downloaded and the partial dir still lacks (only from a meta folder that checks out)."""
    source = meta_dir(volume_dir, plan.model_id, plan.sha)
    if not source.is_dir() or marker_problem(source) is not None:
        return {}
    out = {}
    for name, size in plan.meta_files.items():
        src = source / name
        if (tmp / name).exists() or not src.is_file() or (size is not None and src.stat().st_size != size):
            continue
        out[name] = src
    return out


def _seed(tmp: Path, sources: dict[str, Path]) -> None:
    """Copy those files into the partial dir so they are not requested again (each to a temp name,
    then renamed: a file under its final name is always whole)."""
    for name, src in sources.items():
        dst = tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
        shutil.copyfile(src, part)
        os.replace(part, dst)
