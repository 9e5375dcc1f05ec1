"""The job's deliverable as one file: a reproducible tar.gz of the adapter and the report.

The same inputs give the same bytes (and SHA-256): members in sorted order, owners and times
normalized, no timestamp in the gzip header. Written to a temporary name and renamed, so a crash
never leaves a truncated archive under the final name.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import tarfile
from pathlib import Path

from lora_worker.runtime.files import sha256_file

ARCHIVE_MTIME = 0  # seconds since the epoch stamped on every member and the gzip header (reproducibility)


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Strip what differs between machines and runs (owner, times), keep the permission bits."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = ARCHIVE_MTIME
    return info


def archive_dir(src_dirs: dict[str, Path], archive_path: Path) -> dict:
    """Write a tar.gz holding each source directory under its arcname, e.g.
    {"adapter": adapter_dir, "report": report_dir} -> adapter/..., report/....

    Members are added in sorted order with owners and mtimes normalized and no timestamp in the
    gzip header, so the same inputs give the same bytes (and SHA-256). The archive is written to
    a temporary name next to `archive_path` and renamed, so a crash never leaves a truncated
    archive under the final name.

    Returns {"path": str, "sha256": hex, "size_bytes": int}. Raises for a missing source directory
    or an arcname that is not one plain path segment.
    """
    archive_path = Path(archive_path)
    for arcname, src in src_dirs.items():
        if not arcname or arcname in (".", "..") or "/" in arcname or "\\" in arcname:
            raise ValueError(f"arcname must be one plain path segment, got {arcname!r}")
        if not Path(src).is_dir():
            raise FileNotFoundError(f"archive source for {arcname!r} is not a directory: {src}")
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive_path.with_name(f".{archive_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            # filename="" and mtime=0 keep the gzip header free of the temp name and the clock.
            # Level 6 (gzip's own default): safetensors weights barely compress, and level 9 costs
            # several times the CPU for a fraction of a percent on them.
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=ARCHIVE_MTIME
            ) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for arcname in sorted(src_dirs):
                        _add_tree(tar, Path(src_dirs[arcname]), arcname)
        os.replace(tmp, archive_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {
        "path": str(archive_path),
        "sha256": sha256_file(archive_path),
        "size_bytes": archive_path.stat().st_size,
    }


def _add_tree(tar: tarfile.TarFile, root: Path, arcname: str) -> None:
    """Add `root` as `arcname/` and everything below it, depth-first in sorted name order.
    Symlinks are stored as links (not followed), so nothing outside `root` leaks in."""
    tar.add(root, arcname=arcname, recursive=False, filter=_normalize)
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        member = f"{arcname}/{child.name}"
        if child.is_dir() and not child.is_symlink():
            _add_tree(tar, child, member)
        else:
            tar.add(child, arcname=member, recursive=False, filter=_normalize)
