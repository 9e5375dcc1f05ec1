"""An exclusive lock on a shared network volume that survives its holder dying.

Used for every folder that only one worker may write at a time: a model download, the NF4 copy of
a model, a job's folder. Network volumes are NFS-like mounts where `flock` can succeed for every
process at once, so the lock is a marker file made by exclusive create (`O_CREAT | O_EXCL`, atomic
on NFSv3+ and every local filesystem; what `filelock.SoftFileLock` does, written out here because
releasing must remove only our own marker, never one a peer created after breaking ours). Beside it,
`<lock>.owner.json` says who holds it:

    host, pid, pid_start_ticks   the holder (pid start time from /proc tells a reused pid apart)
    acquired_at, heartbeat_at    epoch seconds; the holder rewrites heartbeat_at every
                                 min(30, stale_lock_s / 4) s from a background thread
    lock_ino, token              inode and content (a random token) of the marker this record
                                 belongs to: an old record of an earlier holder is never read as
                                 the current one's, even when the filesystem reuses the inode
    purpose                      what the lock is for, e.g. "download ORG/NAME@<sha>"

A waiter breaks the lock, with a logged warning, when the holder is a dead process on this host
(or its pid was reused), when its heartbeat is older than `stale_lock_s`, or when there is no owner
record and the marker is older than `stale_lock_s`. Times compare wall clocks of different hosts:
they assume NTP-synced clocks, with `stale_lock_s` far above any skew.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_worker.runtime.files import atomic_write_json, read_json

logger = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_S = 2 * 3600.0  # a 140 GB download at ~50 MB/s takes ~47 min; waiters outlast that
DEFAULT_STALE_LOCK_S = 300.0  # a live holder refreshes its heartbeat every min(30, stale/4) s
LOCK_POLL_S = 0.5  # seconds per lock attempt between stale checks while waiting

Clock = Callable[[], float]


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock, from its owner record (fields are None when the record lacks them)."""

    host: str | None
    pid: int | None
    acquired_at: float | None  # epoch seconds
    heartbeat_at: float | None  # epoch seconds
    purpose: str = ""
    pid_start_ticks: int | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LockOwner:
        def number(key: str) -> float | None:
            value = record.get(key)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        pid = record.get("pid")
        ticks = record.get("pid_start_ticks")
        return cls(
            host=str(record["host"]) if record.get("host") is not None else None,
            pid=pid if isinstance(pid, int) else None,
            acquired_at=number("acquired_at"),
            heartbeat_at=number("heartbeat_at"),
            purpose=str(record.get("purpose") or ""),
            pid_start_ticks=ticks if isinstance(ticks, int) else None,
        )

    def describe(self, now: float) -> str:
        """'pid 12 on host-a (download X), holding it since 2026-01-02T03:04:05Z (300 s), last
        heartbeat 4 s ago': what an operator needs to decide whether to wait."""
        parts = [f"pid {self.pid} on {self.host or 'an unknown host'}"]
        if self.purpose:
            parts[0] += f" ({self.purpose})"
        if self.acquired_at is not None:
            since = dt.datetime.fromtimestamp(self.acquired_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            parts.append(f"holding it since {since} ({now - self.acquired_at:.0f} s)")
        if self.heartbeat_at is not None:
            parts.append(f"last heartbeat {now - self.heartbeat_at:.0f} s ago")
        return ", ".join(parts)


class LockTimeoutError(TimeoutError):
    """Waited `timeout_s` for a lock whose holder is still alive; the message names the holder."""

    def __init__(self, message: str, *, path: Path, owner: LockOwner | None, waited_s: float) -> None:
        super().__init__(message)
        self.path = path
        self.owner = owner
        self.waited_s = waited_s


class LockHeld(LockTimeoutError):
    """A non-blocking acquire (`timeout_s=0`) found the lock held by a live holder."""


# --------------------------------------------------------------------------------------------------
# Is the holder still there? (pure rules, tested directly)


def pid_start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (Linux /proc), to tell a recycled pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 overall; comm may contain spaces
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def stale_reason(
    owner: LockOwner | None, *, lock_mtime: float, now: float, stale_lock_s: float, hostname: str
) -> str | None:
    """Why a lock should be broken, or None while it may still have a live holder.

    `owner` belongs to the current marker (None when its record is missing or describes an earlier
    marker); `lock_mtime` and `now` are epoch seconds.
    """
    if owner is None:
        age = now - lock_mtime
        if age > stale_lock_s:
            return f"lock has no owner record and is {age:.0f} s old"
        return None  # a holder between creating the marker and writing its record
    host, pid = owner.host, owner.pid
    if host == hostname and pid is not None and pid != os.getpid():
        if not pid_alive(pid):
            return f"held by pid {pid} on this host ({host}), which is no longer running"
        start = owner.pid_start_ticks
        if start is not None and pid_start_ticks(pid) not in (None, start):
            return f"held by pid {pid} on this host ({host}), which has exited (the pid was reused)"
    beat = owner.heartbeat_at if owner.heartbeat_at is not None else owner.acquired_at
    if beat is not None and now - beat > stale_lock_s:
        return f"held by pid {pid} on {host}, whose last heartbeat was {now - beat:.0f} s ago (> {stale_lock_s:.0f} s)"
    return None


# --------------------------------------------------------------------------------------------------
# The lock


class VolumeLock:
    """Exclusive lock at `path` on a shared volume; a context manager.

    `acquire()` waits up to `timeout_s` (0: a single attempt) and raises `LockHeld` (timeout 0) or
    `LockTimeoutError`, both naming the holder. `owner()` tells who holds it without taking it.
    `waited_s` is how long the last acquire waited. `on_wait(waited_s)` is called between attempts.
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        stale_lock_s: float = DEFAULT_STALE_LOCK_S,
        purpose: str = "",
        on_wait: Callable[[float], None] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.path = Path(path)
        self.owner_path = self.path.with_name(self.path.name + ".owner.json")
        self.timeout_s = timeout_s
        self.stale_lock_s = stale_lock_s
        self.purpose = purpose
        self.on_wait = on_wait
        self.clock = clock
        self.waited_s = 0.0
        self._token: str | None = None  # what our marker file holds while we hold the lock
        self._ino: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- queries (never change anything) -------------------------------------------------------

    def owner(self) -> LockOwner | None:
        """The current holder, or None when the lock is free. A marker whose holder has not written
        its record yet gives a LockOwner with unknown host and pid."""
        marker = self._marker()
        if marker is None:
            return None
        st, token = marker
        return self._owner_of(st, token) or LockOwner(
            host=None, pid=None, acquired_at=st.st_mtime, heartbeat_at=None
        )

    def is_held(self) -> bool:
        """Whether this object holds the lock and nobody broke it meanwhile (the marker is still ours)."""
        if self._token is None:
            return False
        marker = self._marker()
        return marker is not None and marker[1] == self._token

    def _marker(self, path: Path | None = None) -> tuple[os.stat_result, str] | None:
        """The marker's stat and token, or None when there is no marker."""
        path = path or self.path
        try:
            st = os.lstat(path)
            return st, path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None

    def _owner_of(self, st: os.stat_result, token: str) -> LockOwner | None:
        record = read_json(self.owner_path)
        if not isinstance(record, dict) or record.get("lock_ino") != st.st_ino:
            return None
        if record.get("token") is not None and record.get("token") != token:
            return None  # the record of an earlier marker that happened to get the same inode
        return LockOwner.from_record(record)

    # -- acquire / release -----------------------------------------------------------------------

    def acquire(self, timeout_s: float | None = None) -> VolumeLock:
        """Take the lock, waiting at most `timeout_s` (default: the constructor's; 0: try once)."""
        if self._token is not None:
            raise RuntimeError(f"{self.path} is already held by this VolumeLock (it is not re-entrant)")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        while True:
            self._break_if_stale()
            token = self._try_create()
            if token is not None:
                break
            self.waited_s = time.monotonic() - start
            if self.waited_s >= timeout:
                raise self._held_error(timeout)
            if self.on_wait is not None:
                self.on_wait(self.waited_s)
            time.sleep(min(LOCK_POLL_S, max(timeout - self.waited_s, 0.0)))
        self.waited_s = time.monotonic() - start
        self._token = token
        acquired_at = self.clock()
        try:
            self._write_owner(acquired_at)
        except BaseException:  # a full or read-only volume: give the marker back, then say why
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._token = self._ino = None
            raise
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
        record = read_json(self.owner_path)
        if isinstance(record, dict) and self._token is not None and record.get("token") == self._token:
            with contextlib.suppress(OSError):
                self.owner_path.unlink()
        if self._token is not None:
            if self.is_held():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            else:
                logger.error("lock %s was broken by another worker while held; leaving its marker", self.path)
            self._token = self._ino = None

    def __enter__(self) -> VolumeLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals -------------------------------------------------------------------------------

    def _held_error(self, timeout: float) -> LockTimeoutError:
        owner = self.owner()
        who = owner.describe(self.clock()) if owner else "a holder that has just released it"
        if timeout <= 0:
            return LockHeld(
                f"{self.path} is held by {who}; it is still alive",
                path=self.path,
                owner=owner,
                waited_s=self.waited_s,
            )
        return LockTimeoutError(
            f"waited {self.waited_s:.0f} s for {self.path}, held by {who}; it is still alive. "
            "Retry later, or delete the lock file if you are sure no worker is using it.",
            path=self.path,
            owner=owner,
            waited_s=self.waited_s,
        )

    def _try_create(self) -> str | None:
        """Create the marker exclusively, holding a fresh token; the token, or None when the marker
        exists already."""
        token = uuid.uuid4().hex
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, token.encode("ascii"))
            self._ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        return token

    def _break_if_stale(self) -> None:
        marker = self._marker()
        if marker is None:
            return
        st, token = marker
        owner = self._owner_of(st, token)
        reason = stale_reason(
            owner,
            lock_mtime=st.st_mtime,
            now=self.clock(),
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
            moved = self._marker(aside)
            if moved is None or (moved[0].st_ino, moved[0].st_mtime, moved[1]) != (
                st.st_ino,
                st.st_mtime,
                token,
            ):
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
        atomic_write_json(
            self.owner_path,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pid_start_ticks": pid_start_ticks(os.getpid()),
                "acquired_at": acquired_at,
                "heartbeat_at": self.clock(),
                "lock_ino": self._ino,
                "token": self._token,
                "purpose": self.purpose,
            },
            sort_keys=True,
        )

    def _beat(self, acquired_at: float) -> None:
        interval = max(0.05, min(30.0, self.stale_lock_s / 4))
        while not self._stop.wait(interval):
            if not self.is_held():
                logger.error(
                    "lock %s was broken by another worker while held (heartbeat stalled?)", self.path
                )
                return
            try:
                self._write_owner(acquired_at)
            except OSError as e:  # a transient NFS hiccup; the next beat retries
                logger.warning("could not refresh lock heartbeat %s: %s", self.owner_path, e)
