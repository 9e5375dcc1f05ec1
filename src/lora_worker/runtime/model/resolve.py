"""Find or fetch the base model on the network volume, safely across concurrent workers.

`resolve_base_model()` returns a directory holding `config.json`, the tokenizer and `*.safetensors`,
trying in order:

1. `base_model` is an existing local directory: used as is.
2. RunPod's cached-model location `<volume>/huggingface-cache/hub/models--ORG--NAME/snapshots/<sha>/`
   (standard Hugging Face hub cache layout, filled by RunPod when the endpoint's *Model* field is set);
   the snapshot named by `refs/<revision or main>` wins.
3. This project's own cache `<volume>/models/ORG--NAME/<sha>/`, used only when its `.complete` marker
   (written last, a JSON of files and sizes) is present and every listed file has its listed size.
4. A download from the Hub into (3): pre-flight checks first (model exists, access to gated models,
   causal LM, free space), then file by file into `<volume>/models/ORG--NAME/.<sha>.partial/`, renamed
   into place when complete, marker written last.

Downloads are serialized per model by a lock on the volume (`filelock.SoftFileLock`, an exclusive-create
marker that works on NFS-like mounts where `flock` may be a no-op) plus an owner record (host, pid, times)
that the holder refreshes every few seconds. A waiter breaks the lock, with a logged warning, when the
owner is a dead process on this host or its heartbeat is older than `stale_lock_s`. A partial directory
left by a killed worker is resumed (files it finished are kept, partial files are discarded), never used.

Also here: a pre-quantized NF4 copy of the base model on the volume (`prequantized_dir`,
`find_prequantized`, `save_prequantized`) and a GPU memory estimate for QLoRA
(`estimate_gpu_memory_gib`, `check_gpu_memory`). See docs/model-cache.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

GiB = 1024**3
GB = 1000**3  # free-space messages use decimal GB, as `df -H` and RunPod's volume sizes do

ProgressCallback = Callable[[dict], None]
Source = Literal["local_dir", "runpod_cache", "volume_cache", "downloaded"]

# What a training job needs from a model repo: config, tokenizer and safetensors weights. The original
# Meta checkpoint (`original/*.pth`, another ~140 GB for 70B) and PyTorch pickles are never fetched.
ALLOW_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "*.safetensors.index.json",
)
IGNORE_PATTERNS: tuple[str, ...] = ("original/*", "*.pth", "*.bin", "*.pt")
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

MARKER_NAME = ".complete"
RUNPOD_CACHE_SUBDIR = Path("huggingface-cache") / "hub"
VOLUME_CACHE_SUBDIR = Path("models")

DEFAULT_MIN_FREE_BYTES_MARGIN = 5 * GiB  # room left for logs, checkpoints and the adapter after the download
DEFAULT_LOCK_TIMEOUT_S = 2 * 3600.0  # a 140 GB download at ~50 MB/s takes ~47 min; waiters outlast that
DEFAULT_STALE_LOCK_S = 300.0  # a live holder refreshes its heartbeat every min(30, stale/4) s

# Seconds between progress callbacks while bytes flow (module-level so tests can shrink it).
PROGRESS_POLL_S = 2.0
LOCK_POLL_S = 0.5  # seconds per lock attempt between stale checks while waiting

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelResolutionError(ValueError):
    """The base model cannot be used or fetched; the message says why and what to change."""


class GpuMemoryError(ModelResolutionError):
    """The estimated QLoRA peak does not fit the GPU."""


class LockTimeoutError(TimeoutError):
    """Waited `lock_timeout_s` for another worker's live lock on the same model."""


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
# Small helpers


def _model_key(model_id: str) -> str:
    """Directory name for a model: `org--name` for Hub ids, `local--<basename>-<hash>` for paths."""
    if _REPO_ID_RE.match(model_id):
        return model_id.replace("/", "--")
    digest = hashlib.sha256(str(Path(model_id).expanduser().absolute()).encode()).hexdigest()[:10]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(model_id).name) or "model"
    return f"local--{base}-{digest}"


def _volume_model_dir(volume_dir: Path, model_id: str) -> Path:
    return Path(volume_dir) / VOLUME_CACHE_SUBDIR / _model_key(model_id)


def _wanted(name: str) -> bool:
    if any(fnmatch.fnmatchcase(name, pat) for pat in IGNORE_PATTERNS):
        return False
    return any(fnmatch.fnmatchcase(name, pat) for pat in ALLOW_PATTERNS)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write-then-rename so a reader on another host never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # directory fsync: best effort (not supported everywhere)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _listing(root: Path) -> dict[str, int]:
    """Relative posix path -> size for every regular file under `root`, hidden dirs/files skipped."""
    out: dict[str, int] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file():  # follows symlinks, as in the hub cache's snapshots -> blobs
            out[rel.as_posix()] = p.stat().st_size
    return out


def _write_marker(directory: Path, model_id: str, revision: str | None, extra: dict | None = None) -> None:
    files = _listing(directory)
    _write_json_atomic(
        directory / MARKER_NAME,
        {
            "model_id": model_id,
            "revision": revision,
            "files": files,
            "total_bytes": sum(files.values()),
            "completed_at": time.time(),
            **(extra or {}),
        },
    )


def _marker_problem(directory: Path) -> str | None:
    """None when `directory` has a marker and every file it lists has its listed size."""
    marker = _read_json(directory / MARKER_NAME)
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return "no .complete marker"
    for name, size in marker["files"].items():
        p = directory / name
        try:
            actual = p.stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} is {actual} bytes, the marker says {size}"
    return None


def _model_dir_problem(directory: Path) -> str | None:
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
        index = _read_json(index_path) or {}
        shards = set((index.get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            return f"{index_path.name} lists shards that are missing: {', '.join(missing[:5])}"
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return f"it has no tokenizer ({' / '.join(TOKENIZER_FILES)})"
    return None


def _check_causal_lm(config: dict, what: str) -> None:
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


def _require_usable(directory: Path, what: str) -> None:
    problem = _model_dir_problem(directory)
    if problem:
        raise ModelResolutionError(f"{what} cannot be used as the base model: {problem}")
    _check_causal_lm(_read_json(directory / "config.json") or {}, what)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _emit(on_progress: ProgressCallback | None, event: dict) -> None:
    if on_progress is None:
        return
    try:
        on_progress(event)
    except Exception:  # a broken progress sink must never break the download
        logger.exception("on_progress callback failed")


# --------------------------------------------------------------------------------------------------
# Lock on the volume


def _pid_start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (Linux /proc), to tell a recycled pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 overall; comm may contain spaces
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _stale_reason(
    owner: dict | None, *, lock_mtime: float, now: float, stale_lock_s: float, hostname: str
) -> str | None:
    """Why a lock should be broken, or None while it may still have a live holder.

    `owner` is the owner record that belongs to the current lock marker (None when missing or when it
    describes an earlier marker). Times are wall-clock seconds; across hosts this assumes NTP-synced
    clocks, with `stale_lock_s` far above any skew.
    """
    if owner is None:
        age = now - lock_mtime
        if age > stale_lock_s:
            return f"lock has no owner record and is {age:.0f} s old"
        return None  # a holder between creating the marker and writing its record
    host, pid = owner.get("host"), owner.get("pid")
    if host == hostname and isinstance(pid, int):
        if pid != os.getpid() and not _pid_alive(pid):
            return f"held by pid {pid} on this host ({host}), which is no longer running"
        start = owner.get("pid_start_ticks")
        if pid != os.getpid() and start is not None and _pid_start_ticks(pid) not in (None, start):
            return f"held by pid {pid} on this host ({host}), which has exited (the pid was reused)"
    beat = owner.get("heartbeat_at", owner.get("acquired_at"))
    if isinstance(beat, int | float) and now - beat > stale_lock_s:
        return f"held by pid {pid} on {host}, whose last heartbeat was {now - beat:.0f} s ago (> {stale_lock_s:.0f} s)"
    return None


class VolumeLock:
    """Exclusive lock on the volume for one model directory, safe on NFS-like mounts.

    The marker is a `filelock.SoftFileLock` (exclusive create). Next to it, `<lock>.owner.json` records
    `host`, `pid`, `pid_start_ticks`, `acquired_at`, `heartbeat_at` (epoch seconds) and `lock_ino` (the
    marker's inode, so a record left by an earlier holder is never mistaken for the current one's).
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        stale_lock_s: float = DEFAULT_STALE_LOCK_S,
        purpose: str = "",
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.owner_path = self.path.with_name(self.path.name + ".owner.json")
        self.timeout_s = timeout_s
        self.stale_lock_s = stale_lock_s
        self.purpose = purpose
        self.on_wait = on_wait
        self.waited_s = 0.0
        self._lock: Any = None
        self._ino: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _owner_for_current_marker(self, st: os.stat_result) -> dict | None:
        owner = _read_json(self.owner_path)
        if isinstance(owner, dict) and owner.get("lock_ino") == st.st_ino:
            return owner
        return None

    def _break_if_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        owner = self._owner_for_current_marker(st)
        reason = _stale_reason(
            owner,
            lock_mtime=st.st_mtime,
            now=time.time(),
            stale_lock_s=self.stale_lock_s,
            hostname=socket.gethostname(),
        )
        if reason is None:
            return
        logger.warning("breaking stale lock %s: %s", self.path, reason)
        # Rename aside rather than unlink, then check it is the marker we judged: if a peer replaced it in
        # between, put theirs back (link() refuses to overwrite, so a newer marker is never clobbered).
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = os.lstat(aside)
            if (moved.st_ino, moved.st_mtime) != (st.st_ino, st.st_mtime):
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                return
            if owner is not None:
                with contextlib.suppress(OSError):
                    self.owner_path.unlink()
        finally:
            with contextlib.suppress(OSError):
                aside.unlink()

    def _write_owner(self, acquired_at: float) -> None:
        _write_json_atomic(
            self.owner_path,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start_ticks": _pid_start_ticks(os.getpid()),
                "acquired_at": acquired_at,
                "heartbeat_at": time.time(),
                "lock_ino": self._ino,
                "purpose": self.purpose,
            },
        )

    def _beat(self, acquired_at: float) -> None:
        interval = max(0.05, min(30.0, self.stale_lock_s / 4))
        while not self._stop.wait(interval):
            try:
                self._write_owner(acquired_at)
            except OSError as e:  # a transient NFS hiccup; the next beat retries
                logger.warning("could not refresh lock heartbeat %s: %s", self.owner_path, e)

    def acquire(self) -> VolumeLock:
        from filelock import SoftFileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        lock = SoftFileLock(str(self.path), thread_local=False)
        while True:
            self._break_if_stale()
            try:
                lock.acquire(timeout=LOCK_POLL_S)
                break
            except Timeout:
                pass
            self.waited_s = time.monotonic() - start
            if self.on_wait is not None:
                self.on_wait(self.waited_s)
            if self.waited_s > self.timeout_s:
                owner = _read_json(self.owner_path) or {}
                raise LockTimeoutError(
                    f"waited {self.waited_s:.0f} s for {self.path} held by pid {owner.get('pid')} on "
                    f"{owner.get('host')} ({owner.get('purpose') or 'unknown purpose'}); it is still alive. "
                    "Retry later, or delete the lock file if you are sure no worker is using it."
                )
        self.waited_s = time.monotonic() - start
        self._lock = lock
        self._ino = os.lstat(self.path).st_ino
        acquired_at = time.time()
        self._write_owner(acquired_at)
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(acquired_at,), name="lock-heartbeat", daemon=True
        )
        self._heartbeat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        owner = _read_json(self.owner_path)
        if isinstance(owner, dict) and owner.get("lock_ino") == self._ino and owner.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                self.owner_path.unlink()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> VolumeLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------
# Cache lookups


def _find_runpod_snapshot(volume_dir: Path, model_id: str, revision: str | None) -> tuple[Path, str] | None:
    """The complete snapshot RunPod cached for this model, as (path, sha), or None."""
    repo = Path(volume_dir) / RUNPOD_CACHE_SUBDIR / f"models--{model_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    if revision and _SHA_RE.match(revision):
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
        problem = _model_dir_problem(snap)
        if problem is None:
            return snap, snap.name
        logger.warning("ignoring RunPod cached snapshot %s: %s", snap, problem)
    return None


def _volume_ref(model_dir: Path, revision: str | None) -> str | None:
    if revision and _SHA_RE.match(revision):
        return revision
    ref = model_dir / "refs" / _ref_name(revision)
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if _SHA_RE.match(sha) else None


def _ref_name(revision: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", revision or "main")


def _find_volume_cache(model_dir: Path, sha: str | None) -> Path | None:
    if not sha:
        return None
    snap = model_dir / sha
    if not snap.is_dir():
        return None
    problem = _marker_problem(snap)
    if problem is None:
        return snap
    logger.warning("not using %s: %s", snap, problem)
    return None


# --------------------------------------------------------------------------------------------------
# Hub access


def _licence_url(model_id: str) -> str:
    return f"https://huggingface.co/{model_id}"


def _hub_error(
    exc: Exception, model_id: str, revision: str | None, hf_token: str | None, endpoint: str
) -> Exception:
    """Translate huggingface_hub errors into a ModelResolutionError the endpoint owner can act on."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        return _gated_error(model_id, hf_token)
    if isinstance(exc, RepositoryNotFoundError):
        hint = (
            "the HF_TOKEN set on the endpoint has no access to it"
            if hf_token
            else "if it is private, set the HF_TOKEN env var on the endpoint to a token with access"
        )
        return ModelResolutionError(
            f"model {model_id!r} was not found on the Hugging Face Hub ({endpoint}); check the id for typos ({hint})"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelResolutionError(f"revision {revision!r} of {model_id} does not exist on the Hub")
    if (
        isinstance(exc, HfHubHTTPError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
    ):
        return ModelResolutionError(
            f"the Hub refused access to {model_id} (HTTP {exc.response.status_code}): check that the HF_TOKEN "
            f"env var on the endpoint is a valid token that has accepted the model's licence at {_licence_url(model_id)}"
        )
    return exc


def _gated_error(model_id: str, hf_token: str | None) -> ModelResolutionError:
    if hf_token:
        return ModelResolutionError(
            f"{model_id} is a gated model and the HF_TOKEN set on the endpoint has not been granted access: "
            f"accept the model's licence at {_licence_url(model_id)} with the account that owns the token, "
            "or set the HF_TOKEN env var on the endpoint to a token that has accepted it"
        )
    return ModelResolutionError(
        f"{model_id} is a gated model and no Hugging Face token is set: set the HF_TOKEN env var on the endpoint "
        f"to a token that has accepted the model's licence at {_licence_url(model_id)}"
    )


@dataclass
class _RepoPlan:
    sha: str
    files: dict[str, int | None]
    """Files to fetch (after allow/ignore filtering) -> size in bytes when the Hub reported it."""


def _plan_download(
    api: Any, model_id: str, revision: str | None, hf_token: str | None, endpoint: str
) -> _RepoPlan:
    """Pre-flight against the Hub: existence, access, file list and sizes. Fetches no file."""
    try:
        info = api.model_info(model_id, revision=revision, files_metadata=True)
    except Exception as e:
        mapped = _hub_error(e, model_id, revision, hf_token, endpoint)
        if mapped is e:
            raise
        raise mapped from e
    if info.gated and not hf_token:
        raise _gated_error(model_id, hf_token)
    if isinstance(info.config, dict) and info.config.get("architectures"):
        # The Hub summarizes config.json in model_info; the file itself is checked again once fetched.
        _check_causal_lm(info.config, model_id)
    sha = info.sha or (revision if revision and _SHA_RE.match(revision) else None)
    if not sha:
        raise ModelResolutionError(
            f"the Hub did not report a commit sha for {model_id} at {revision or 'main'}"
        )
    siblings = info.siblings or []
    files: dict[str, int | None] = {}
    for s in siblings:
        if _wanted(s.rfilename):
            files[s.rfilename] = s.lfs.size if s.lfs is not None else s.size
    names = [s.rfilename for s in siblings]
    if "config.json" not in files:
        raise ModelResolutionError(
            f"{model_id} has no config.json on the Hub; it is not a transformers model"
        )
    if not any(n.endswith(".safetensors") for n in files):
        others = [n for n in names if n.endswith((".bin", ".pth", ".pt", ".gguf"))][:3]
        raise ModelResolutionError(
            f"{model_id} has no *.safetensors weights on the Hub"
            + (f" (only {', '.join(others)})" if others else "")
            + "; the worker loads safetensors checkpoints only"
        )
    return _RepoPlan(sha=sha, files=files)


def _check_free_space(directory: Path, need_bytes: int, margin_bytes: int, model_id: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < need_bytes + margin_bytes:
        raise ModelResolutionError(
            f"not enough free space on the volume for {model_id}: the download needs {need_bytes / GB:.2f} GB "
            f"plus a {margin_bytes / GB:.2f} GB margin ({(need_bytes + margin_bytes) / GB:.2f} GB), but only "
            f"{free / GB:.2f} GB is free at {directory}. Grow the network volume or delete unused models under "
            f"{directory.parent}."
        )


class _DownloadProgress:
    """Turns byte counts into throttled `model_download` progress events."""

    def __init__(self, on_progress: ProgressCallback | None, files: dict[str, int | None]) -> None:
        self.on_progress = on_progress
        self.files = files
        self.bytes_total = sum(s or 0 for s in files.values())
        self.files_total = len(files)
        self.completed_bytes = 0
        self.files_done = 0
        self.inflight = 0
        self.fetched = 0  # bytes that came over the network in this call
        self.started = time.monotonic()
        self._last_bytes = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.inflight += n
            self.fetched += n

    def file_done(self, size: int) -> None:
        with self._lock:
            self.completed_bytes += size
            self.files_done += 1
            self.inflight = 0
        self.emit(force=True)

    def emit(self, force: bool = False) -> None:
        with self._lock:
            done = min(
                self.completed_bytes + max(self.inflight, 0), max(self.bytes_total, self.completed_bytes)
            )
            done = max(done, self._last_bytes)  # never report going backwards (a retried file restarts)
            if not force and done == self._last_bytes:
                return
            self._last_bytes = done
            elapsed = max(time.monotonic() - self.started, 1e-6)
            event = {
                "stage": "model_download",
                "bytes_done": int(done),
                "bytes_total": int(self.bytes_total),
                "files_done": self.files_done,
                "files_total": self.files_total,
                "rate_mb_s": round(self.fetched / elapsed / 1e6, 3),
            }
        _emit(self.on_progress, event)

    def _poll(self) -> None:
        while not self._stop.wait(PROGRESS_POLL_S):
            self.emit()

    def __enter__(self) -> _DownloadProgress:
        if self.on_progress is not None:
            self._thread = threading.Thread(target=self._poll, name="download-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def tqdm_class(self) -> type:
        """A tqdm stand-in for hf_hub_download: counts bytes, draws no bar (worker logs stay clean)."""
        progress = self

        class _ByteCounter:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def __enter__(self) -> _ByteCounter:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def update(self, n: float | None = 1) -> None:
                progress.add_bytes(int(n or 0))

            def close(self) -> None:
                pass

            def refresh(self, *args: Any, **kwargs: Any) -> None:
                pass

            def set_description(self, *args: Any, **kwargs: Any) -> None:
                pass

            def set_postfix(self, *args: Any, **kwargs: Any) -> None:
                pass

        return _ByteCounter


def _partial_state(
    tmp: Path, files: dict[str, int | None], *, require_metadata: bool = False
) -> tuple[dict[str, int], int]:
    """Files already complete in a partial dir (name -> size) and bytes of in-flight `.incomplete` files.

    With `require_metadata`, only files hf_hub_download recorded as finished at this commit count (those
    it will return without fetching); others of the right size are re-checked by it.
    """
    done: dict[str, int] = {}
    meta_dir = tmp / ".cache" / "huggingface" / "download"
    for name, size in files.items():
        p = tmp / name
        if require_metadata and not (meta_dir / f"{name}.metadata").is_file():
            continue
        with contextlib.suppress(OSError):
            actual = p.stat().st_size
            if size is None or actual == size:
                done[name] = actual
    inflight = 0
    dl = tmp / ".cache" / "huggingface" / "download"
    if dl.is_dir():
        for p in dl.rglob("*.incomplete"):
            with contextlib.suppress(OSError):
                inflight += p.stat().st_size
    return done, inflight


def _prepare_partial(final: Path, tmp: Path, files: dict[str, int | None]) -> None:
    """Make `tmp` a clean place to resume into: adopt an unmarked final dir, drop partial/stray files."""
    if final.exists():
        # Renamed but killed before the marker: treat it as a partial download.
        if tmp.exists():
            _rmtree(final)
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
    for name, actual in _listing(tmp).items():
        expected = files.get(name, -1)
        if expected == -1 or (expected is not None and expected != actual):
            (tmp / name).unlink(missing_ok=True)


def _download(
    model_id: str,
    *,
    volume_dir: Path,
    hf_token: str | None,
    hf_endpoint: str | None,
    revision: str | None,
    on_progress: ProgressCallback | None,
    min_free_bytes_margin: int,
    lock_timeout_s: float,
    stale_lock_s: float,
) -> tuple[Path, Source, str, int, dict[str, float]]:
    from huggingface_hub import HfApi, hf_hub_download

    endpoint = (hf_endpoint or "https://huggingface.co").rstrip("/")
    token: str | bool = hf_token or False  # False: never fall back to a token from env or ~/.cache
    api = HfApi(endpoint=endpoint, token=token)
    plan = _plan_download(api, model_id, revision, hf_token, endpoint)
    model_dir = _volume_model_dir(volume_dir, model_id)
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / plan.sha
    tmp = model_dir / f".{plan.sha}.partial"
    timings: dict[str, float] = {}

    def record_ref() -> None:
        if revision is None or not _SHA_RE.match(revision):
            (model_dir / "refs").mkdir(exist_ok=True)
            ref = model_dir / "refs" / _ref_name(revision)
            tmp_ref = ref.with_name(f".{ref.name}.{uuid.uuid4().hex[:8]}")
            tmp_ref.write_text(plan.sha)
            os.replace(tmp_ref, ref)

    cached = _find_volume_cache(model_dir, plan.sha)
    if cached is not None:  # complete under its sha but no ref for this revision name yet
        record_ref()
        return cached, "volume_cache", plan.sha, 0, timings

    waiter_state = {"last": -1.0, "bytes": 0, "at": time.monotonic()}
    bytes_total = sum(s or 0 for s in plan.files.values())

    def on_wait(waited: float) -> None:
        # While another worker downloads, report its progress from the partial dir it is filling.
        if on_progress is None or waited - waiter_state["last"] < PROGRESS_POLL_S:
            return
        done, inflight = _partial_state(tmp, plan.files)
        now = time.monotonic()
        bytes_done = min(sum(done.values()) + inflight, bytes_total)
        rate = max(bytes_done - waiter_state["bytes"], 0) / max(now - waiter_state["at"], 1e-6) / 1e6
        waiter_state.update(last=waited, bytes=bytes_done, at=now)
        _emit(
            on_progress,
            {
                "stage": "model_download",
                "bytes_done": int(bytes_done),
                "bytes_total": int(bytes_total),
                "files_done": len(done),
                "files_total": len(plan.files),
                "rate_mb_s": round(rate, 3),
                "waiting_for_lock": True,
            },
        )

    lock = VolumeLock(
        model_dir / ".download.lock",
        timeout_s=lock_timeout_s,
        stale_lock_s=stale_lock_s,
        purpose=f"download {model_id}@{plan.sha}",
        on_wait=on_wait,
    )
    with lock:
        timings["lock_wait"] = round(lock.waited_s, 3)
        cached = _find_volume_cache(model_dir, plan.sha)
        if cached is not None:  # another worker finished it while we waited
            record_ref()
            return cached, "volume_cache", plan.sha, 0, timings
        if final.exists() and (final / MARKER_NAME).exists():
            logger.warning("%s failed verification (%s); downloading it again", final, _marker_problem(final))
            _rmtree(final)
        _prepare_partial(final, tmp, plan.files)

        already, _ = _partial_state(tmp, plan.files, require_metadata=True)
        need = sum((size or 0) for name, size in plan.files.items() if name not in already)
        try:
            _check_free_space(model_dir, need, min_free_bytes_margin, model_id)
        except ModelResolutionError:
            if not already:
                _rmtree(tmp)
            raise

        # config.json first: the causal-LM check runs before any weight byte is fetched.
        order = sorted(plan.files, key=lambda n: (n != "config.json", plan.files[n] or 0, n))
        progress = _DownloadProgress(on_progress, plan.files)
        progress.completed_bytes = sum(already.values())
        progress.files_done = len(already)
        t0 = time.monotonic()
        try:
            with progress:
                progress.emit(force=True)
                counter = progress.tqdm_class()
                for name in order:
                    expected = plan.files[name]
                    # Files an earlier (killed) worker finished come back from hf_hub_download without a
                    # request: their local metadata names this commit.
                    path = Path(
                        hf_hub_download(
                            model_id,
                            name,
                            revision=plan.sha,
                            local_dir=tmp,
                            # read-only lookup: a file RunPod already cached is copied, not re-downloaded
                            cache_dir=Path(volume_dir) / RUNPOD_CACHE_SUBDIR,
                            endpoint=endpoint,
                            token=token,
                            tqdm_class=counter,  # type: ignore[arg-type]
                        )
                    )
                    size = path.stat().st_size
                    if expected is not None and size != expected:
                        path.unlink(missing_ok=True)
                        raise OSError(f"downloaded {name} is {size} bytes, the Hub listed {expected}")
                    if name not in already:
                        progress.file_done(size)
                    if name == "config.json":
                        try:
                            _check_causal_lm(_read_json(path) or {}, model_id)
                        except ModelResolutionError:
                            _rmtree(tmp)
                            raise
        except Exception as e:
            if tmp.is_dir() and not _listing(tmp):
                _rmtree(tmp)  # nothing finished: leave no empty partial dir behind
            if isinstance(e, ModelResolutionError):
                raise
            mapped = _hub_error(e, model_id, revision, hf_token, endpoint)
            if mapped is e:
                raise
            raise mapped from e
        timings["download"] = round(time.monotonic() - t0, 3)

        _rmtree(tmp / ".cache")  # hf_hub_download's per-file metadata; the marker replaces it
        os.replace(tmp, final)
        _write_marker(final, model_id, plan.sha, {"source": "downloaded", "endpoint": endpoint})
        record_ref()
        progress.emit(force=True)
        return final, "downloaded", plan.sha, progress.fetched, timings


# --------------------------------------------------------------------------------------------------
# Public API


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or os.sep != "/" and os.sep in value
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
    """Return a local directory with the base model, downloading it to the volume if needed.

    Raises ModelResolutionError for problems the endpoint owner must fix (unknown id, gated without
    token, not a causal LM, volume too small), LockTimeoutError when another live worker holds the
    model's lock for longer than `lock_timeout_s` seconds.
    """
    t0 = time.monotonic()
    volume_dir = Path(volume_dir)

    def result(
        path: Path,
        source: Source,
        model_id: str,
        sha: str | None,
        nbytes: int = 0,
        timings: dict | None = None,
    ) -> ResolvedModel:
        t = {"download": 0.0, **(timings or {})}
        t["resolve"] = round(time.monotonic() - t0, 3)
        logger.info("base model %s -> %s (%s, %.1f s)", model_id, path, source, t["resolve"])
        return ResolvedModel(
            path=path, source=source, model_id=model_id, revision=sha, timings=t, downloaded_bytes=nbytes
        )

    local = Path(base_model).expanduser()
    if local.is_dir():
        local = local.resolve()
        _require_usable(local, f"local directory {local}")
        return result(local, "local_dir", str(local), None)
    if _looks_like_path(base_model) or not _REPO_ID_RE.match(base_model):
        raise ModelResolutionError(
            f"base_model {base_model!r} is neither an existing directory nor a Hugging Face model id of the form ORG/NAME"
        )

    found = _find_runpod_snapshot(volume_dir, base_model, revision)
    if found is not None:
        snap, sha = found
        _check_causal_lm(_read_json(snap / "config.json") or {}, base_model)
        return result(snap, "runpod_cache", base_model, sha)

    model_dir = _volume_model_dir(volume_dir, base_model)
    cached = _find_volume_cache(model_dir, _volume_ref(model_dir, revision))
    if cached is not None:
        _check_causal_lm(_read_json(cached / "config.json") or {}, base_model)
        return result(cached, "volume_cache", base_model, cached.name)

    path, source, sha, nbytes, timings = _download(
        base_model,
        volume_dir=volume_dir,
        hf_token=hf_token,
        hf_endpoint=hf_endpoint,
        revision=revision,
        on_progress=on_progress,
        min_free_bytes_margin=min_free_bytes_margin,
        lock_timeout_s=lock_timeout_s,
        stale_lock_s=stale_lock_s,
    )
    return result(path, source, base_model, sha, nbytes, timings)


# --------------------------------------------------------------------------------------------------
# Pre-quantized NF4 copy


def _quant_hash(quant: dict) -> str:
    # default=str: BitsAndBytesConfig.to_dict() holds enums/dtypes; their str() is stable across runs.
    blob = json.dumps(quant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def prequantized_dir(volume_dir: Path, model_id: str, revision: str | None, quant: dict) -> Path:
    """Where the pre-quantized copy of (model, revision, quantization settings) lives on the volume."""
    rev = revision if revision else "norev"
    return (
        _volume_model_dir(volume_dir, model_id) / "prequantized" / f"{_ref_name(rev)}--q{_quant_hash(quant)}"
    )


def find_prequantized(volume_dir: Path, model_id: str, revision: str | None, quant: dict) -> Path | None:
    """The pre-quantized copy's directory when its `.complete` marker exists and checks out, else None."""
    target = prequantized_dir(volume_dir, model_id, revision, quant)
    if not target.is_dir():
        return None
    problem = _marker_problem(target)
    if problem is not None:
        logger.warning("not using pre-quantized copy %s: %s", target, problem)
        return None
    return target


def save_prequantized(
    model: Any, tokenizer: Any, target: Path, *, stale_lock_s: float = DEFAULT_STALE_LOCK_S
) -> Path:
    """Save a bitsandbytes-4bit model + tokenizer to `target` (safetensors) atomically; returns `target`.

    Call it right after loading, before the first forward: on CPU, bitsandbytes repacks 4-bit weights
    at the first forward and converting them back for saving rounds a quantization constant, so a copy
    saved afterwards is not bit-identical to what was loaded (GPUs do not repack).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with VolumeLock(
        target.parent / f".{target.name}.lock",
        stale_lock_s=stale_lock_s,
        purpose=f"prequantize {target.name}",
    ):
        if target.is_dir() and _marker_problem(target) is None:
            return target  # another worker saved it meanwhile
        tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            model.save_pretrained(tmp)  # transformers 5 always writes safetensors
            tokenizer.save_pretrained(tmp)
            if not list(tmp.glob("*.safetensors")):
                raise OSError(f"save_pretrained wrote no *.safetensors into {tmp}")
            if target.exists():
                _rmtree(target)
            os.replace(tmp, target)
        finally:
            _rmtree(tmp)
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
        quant = qc.to_dict() if hasattr(qc, "to_dict") else qc
        _write_marker(
            target,
            str(getattr(getattr(model, "config", None), "_name_or_path", "")),
            None,
            {"quantization": quant},
        )
    return target


# --------------------------------------------------------------------------------------------------
# GPU memory


def estimate_gpu_memory_gib(config: dict, *, lora_r: int, micro_batch_tokens: int, bits: int = 4) -> float:
    """Estimated peak GPU memory (GiB) of QLoRA training with gradient checkpointing.

    Calibrated against measured peaks for Llama 3 70B on one H100 (r=16, LoRA on all linear layers):
    ~41.6 GiB at 2048 tokens per micro-batch, ~51 GiB at 8192, ~65 GiB at 16384.
    """
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, not {bits}")
    h = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    tokens = int(micro_batch_tokens)

    # (in, out) of the 7 projections LoRA targets in each decoder layer.
    projections = [(h, q_dim), (h, kv_dim), (h, kv_dim), (q_dim, h), (h, inter), (h, inter), (inter, h)]
    linear_params = layers * sum(i * o for i, o in projections)
    # Embeddings, lm_head and norms stay in bf16 (bitsandbytes quantizes only the decoder's Linear layers).
    bf16_params = vocab * h * (1 if config.get("tie_word_embeddings") else 2) + (2 * layers + 1) * h
    quant_constants = {4: 0.03, 8: 0.005, 16: 0.0}[bits]  # NF4 double-quant absmax ~3% of the 0.5 B/param
    weights = linear_params * bits / 8 * (1 + quant_constants) + bf16_params * 2

    # LoRA A and B: fp32 weights (4 B) + fp32 grads (4 B) + 8-bit Adam's two states (2 B) per parameter.
    lora = layers * lora_r * sum(i + o for i, o in projections) * 10

    # Gradient checkpointing keeps each layer's bf16 input; backward recomputes one layer at a time,
    # whose working set is the MLP's gate/up/act outputs plus attention q/k/v/o and norm outputs.
    checkpoints = layers * h * tokens * 2
    working_set = tokens * (3 * inter + 2 * q_dim + 2 * kv_dim + h) * 2
    # Caching-allocator fragmentation grows with block sizes, i.e. with the tokens per micro-batch:
    # fitted to the measured 8k/16k peaks (+6% / +12.5% of activations).
    fragmentation = (checkpoints + working_set) * tokens / 131072
    return (weights + lora + checkpoints + working_set + fragmentation) / GiB


def check_gpu_memory(estimate_gib: float, available_gib: float) -> None:
    """Raise GpuMemoryError (a ModelResolutionError) when the estimate does not fit the GPU."""
    if estimate_gib > available_gib:
        raise GpuMemoryError(
            f"estimated peak GPU memory {estimate_gib:.1f} GiB exceeds the {available_gib:.1f} GiB available on this GPU: "
            "lower micro_batch_tokens (tokens per micro-batch) or max_seq_length, or lower lora_r, "
            "or run on a GPU with more memory"
        )


# --------------------------------------------------------------------------------------------------
# Terminal entry point (pre-warming the cache by hand: `python -m lora_worker.runtime.model.resolve ORG/NAME`)


def main(argv: list[str] | None = None) -> int:
    from lora_worker.runtime.settings import Settings

    parser = argparse.ArgumentParser(
        prog="python -m lora_worker.runtime.model.resolve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("base_model", help="Hub id (ORG/NAME) or a local directory")
    parser.add_argument("--revision", default=None, help="branch, tag or commit sha (default: main)")
    parser.add_argument(
        "--volume-dir", type=Path, default=None, help="default: VOLUME_DIR / /runpod-volume / ./.volume"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()

    def show(event: dict) -> None:
        print(
            f"{event['files_done']}/{event['files_total']} files, {event['bytes_done'] / GB:.2f}/"
            f"{event['bytes_total'] / GB:.2f} GB, {event['rate_mb_s']:.0f} MB/s",
            file=sys.stderr,
        )

    try:
        resolved = resolve_base_model(
            args.base_model,
            volume_dir=args.volume_dir or settings.volume_dir,
            hf_token=settings.hf_token,
            hf_endpoint=settings.hf_endpoint,
            revision=args.revision,
            on_progress=show,
        )
    except ModelResolutionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**resolved.__dict__, "path": str(resolved.path)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
