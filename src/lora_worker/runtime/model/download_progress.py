"""`model_download` progress events while the weights arrive, or while another worker fetches them.

An event, at most every PROGRESS_POLL_S seconds while bytes flow and after every file:

    {"stage": "model_download", "bytes_done": int, "bytes_total": int, "files_done": int,
     "files_total": int, "rate_mb_s": float}            (+ "waiting_for_lock": true for a waiter)

`bytes_done` never decreases. A callback that raises is logged and ignored: a broken progress sink
must never break the download.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[dict], None]

# Seconds between progress callbacks while bytes flow (module-level so tests can shrink it).
PROGRESS_POLL_S = 2.0


def emit(on_progress: ProgressCallback | None, event: dict) -> None:
    if on_progress is None:
        return
    try:
        on_progress(event)
    except Exception:  # a broken progress sink must never break the download
        logger.exception("on_progress callback failed")


def partial_state(
    tmp: Path, files: dict[str, int | None], *, require_metadata: bool = False
) -> tuple[dict[str, int], int]:
    """Files already complete in a partial download dir (name -> size) and bytes of in-flight
    `.incomplete` files. A file of unknown size counts only once hf_hub_download recorded it."""
    done: dict[str, int] = {}
    meta_dir = tmp / ".cache" / "huggingface" / "download"
    for name, size in files.items():
        if (size is None or require_metadata) and not (meta_dir / f"{name}.metadata").is_file():
            continue
        with contextlib.suppress(OSError):
            actual = (tmp / name).stat().st_size
            if size is None or actual == size:
                done[name] = actual
    inflight = 0
    if meta_dir.is_dir():
        for p in meta_dir.rglob("*.incomplete"):
            with contextlib.suppress(OSError):
                inflight += p.stat().st_size
    return done, inflight


class DownloadProgress:
    """Turns byte counts of this worker's download into throttled events (a context manager that
    polls in a thread while it is open)."""

    def __init__(self, on_progress: ProgressCallback | None, files: dict[str, int | None]) -> None:
        self.on_progress = on_progress
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
        emit(self.on_progress, event)

    def _poll(self) -> None:
        while not self._stop.wait(PROGRESS_POLL_S):
            self.emit()

    def __enter__(self) -> DownloadProgress:
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


class WaiterProgress:
    """While another worker holds the download lock, reports its progress from the partial dir it
    is filling (an `on_wait` callback for VolumeLock)."""

    def __init__(self, on_progress: ProgressCallback | None, tmp: Path, files: dict[str, int | None]) -> None:
        self.on_progress = on_progress
        self.tmp = tmp
        self.files = files
        self.bytes_total = sum(s or 0 for s in files.values())
        self._last_waited = -1.0
        self._last_bytes = 0
        self._at = time.monotonic()

    def __call__(self, waited: float) -> None:
        if self.on_progress is None or waited - self._last_waited < PROGRESS_POLL_S:
            return
        done, inflight = partial_state(self.tmp, self.files)
        now = time.monotonic()
        bytes_done = min(sum(done.values()) + inflight, self.bytes_total)
        rate = max(bytes_done - self._last_bytes, 0) / max(now - self._at, 1e-6) / 1e6
        self._last_waited, self._last_bytes, self._at = waited, bytes_done, now
        emit(
            self.on_progress,
            {
                "stage": "model_download",
                "bytes_done": int(bytes_done),
                "bytes_total": int(self.bytes_total),
                "files_done": len(done),
                "files_total": len(self.files),
                "rate_mb_s": round(rate, 3),
                "waiting_for_lock": True,
            },
        )
