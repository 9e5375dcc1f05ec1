"""Files on the volume: strict JSON, atomic writes, checksums and free space.

One implementation of each, used by every stage. A network volume may be shared by many workers,
may fill up and may be read by another host mid-write, so every file a reader may see is written
to a temporary name in the same folder, flushed, fsynced and renamed into place; a failed write
removes its temporary file and re-raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20  # read size for streaming hashes: keeps memory flat for multi-GB files
GB = 1000**3  # messages use decimal GB, as `df -H` and RunPod's volume sizes do


class DiskSpaceError(OSError):
    """Not enough free space for a write; the message gives the numbers in GB."""


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN and infinities become null (JavaScript's JSON.parse and PostgreSQL's
    jsonb reject them), numpy/torch scalars become numbers, paths and other objects strings."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            return json_safe(item())
    return str(value)


def dumps_strict(obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """JSON text that every strict parser accepts (never a bare NaN or Infinity)."""
    return json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys, allow_nan=False, ensure_ascii=False)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part.

    Raises OSError (ENOSPC on a full volume, EROFS on a read-only one) after removing the
    temporary file, so a failed write leaves nothing behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    atomic_write_bytes(path, (dumps_strict(obj, indent=indent, sort_keys=sort_keys) + "\n").encode("utf-8"))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: Path) -> None:
    """Persist a rename: best effort, since some filesystems (and network mounts) refuse it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    return digest_file(path, hashlib.sha256())


def digest_file(path: Path, digest: Any) -> str:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(path: Path, need_bytes: int, what: str, *, margin_bytes: int = 0) -> None:
    """Raise DiskSpaceError, in GB, when `need_bytes` plus `margin_bytes` do not fit at `path`."""
    free = free_bytes(path)
    if need_bytes + margin_bytes > free:
        raise DiskSpaceError(
            f"not enough free space for {what}: needs about {need_bytes / GB:.2f} GB"
            + (f" (+{margin_bytes / GB:.1f} GB kept free)" if margin_bytes else "")
            + f", {free / GB:.2f} GB free on the volume at {path}; free space on the volume "
            "(`prune` from a lora-worker checkout lists what old jobs hold) or use a larger one"
        )


def tree_bytes(path: Path) -> int:
    """Bytes of every regular file under `path` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total
