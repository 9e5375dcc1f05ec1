"""The volume lock with real processes: a live holder is named, a dead or silent one is replaced."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lora_worker
from lora_worker.runtime.volume_lock import (
    LockHeld,
    LockOwner,
    LockTimeoutError,
    VolumeLock,
    pid_start_ticks,
    stale_reason,
)

SRC = str(Path(lora_worker.__file__).resolve().parents[1])
HOST = socket.gethostname()


def hold_in_child(path: Path) -> subprocess.Popen[str]:
    """Another process that takes the lock, says so on stdout, and holds it until killed."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from lora_worker.runtime.volume_lock import VolumeLock\n"
        f"VolumeLock(Path({str(path)!r}), purpose='job j-1').acquire()\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def plant_owner(path: Path, **record: object) -> None:
    """A lock marker plus the owner record a holder on another host would have written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    owner = {"lock_ino": path.stat().st_ino, **record}
    path.with_name(path.name + ".owner.json").write_text(json.dumps(owner))


def test_a_live_holder_in_another_process_is_named_and_a_dead_one_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jobs" / "j-1" / ".job.lock"
    child = hold_in_child(path)
    try:
        lock = VolumeLock(path, stale_lock_s=3600)
        with pytest.raises(LockHeld) as held:
            lock.acquire(timeout_s=0)
        msg = str(held.value)
        assert f"pid {child.pid} on {HOST} (job j-1)" in msg
        assert "holding it since 20" in msg and "last heartbeat" in msg
        assert isinstance(held.value, LockTimeoutError) and held.value.owner is not None
        owner = lock.owner()
        assert owner is not None and owner.pid == child.pid and owner.host == HOST
        assert owner.purpose == "job j-1" and owner.heartbeat_at is not None
        assert not lock.is_held()
    finally:
        child.kill()  # SIGKILL: the holder dies without releasing
        child.wait()

    with caplog.at_level(logging.WARNING):
        lock.acquire(timeout_s=0)  # a dead pid on this host: broken at once, whatever its age
    try:
        assert f"held by pid {child.pid} on this host ({HOST}), which is no longer running" in caplog.text
        assert lock.is_held() and lock.owner() is not None and lock.owner().pid == os.getpid()  # type: ignore[union-attr]
    finally:
        lock.release()
    assert lock.owner() is None and not path.exists()


def test_a_silent_holder_on_another_host_is_broken_after_the_heartbeat_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ".download.lock"
    now = 1_800_000_000.0
    plant_owner(path, host="other-host", pid=4242, acquired_at=now - 400, heartbeat_at=now - 10, purpose="x")

    fresh = VolumeLock(path, stale_lock_s=300, clock=lambda: now)
    with pytest.raises(LockHeld) as held:
        fresh.acquire(timeout_s=0)
    assert str(held.value) == (
        f"{path} is held by pid 4242 on other-host (x), holding it since 2027-01-15T07:53:20Z (400 s), "
        "last heartbeat 10 s ago; it is still alive"
    )

    later = now + 300  # the heartbeat is now 310 s old
    with caplog.at_level(logging.WARNING):
        with VolumeLock(path, stale_lock_s=300, clock=lambda: later) as lock:
            assert lock.is_held()
    assert "held by pid 4242 on other-host, whose last heartbeat was 310 s ago (> 300 s)" in caplog.text


def test_waiting_with_a_timeout_raises_lock_timeout_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    plant_owner(path, host="other-host", pid=7, acquired_at=time.time(), heartbeat_at=time.time())
    waits: list[float] = []
    with pytest.raises(LockTimeoutError) as err:
        VolumeLock(path, timeout_s=0.6, on_wait=waits.append).acquire()
    assert not isinstance(err.value, LockHeld)
    assert re.match(rf"waited \d+ s for {re.escape(str(path))}, held by pid 7 on other-host", str(err.value))
    assert waits and err.value.waited_s >= 0.6


def test_stale_reason_rules() -> None:
    now = 1_000_000.0
    me = os.getpid()
    live_here = LockOwner(host="me", pid=me, acquired_at=now - 5, heartbeat_at=now - 1)
    assert stale_reason(live_here, lock_mtime=now, now=now, stale_lock_s=60, hostname="me") is None
    old_beat = LockOwner(host="me", pid=me, acquired_at=now - 99, heartbeat_at=now - 61)
    assert stale_reason(old_beat, lock_mtime=now, now=now, stale_lock_s=60, hostname="me")
    # Another host: its pid cannot be checked here, only the heartbeat's age.
    remote = LockOwner(host="elsewhere", pid=999_999_999, acquired_at=now, heartbeat_at=now - 30)
    assert stale_reason(remote, lock_mtime=now, now=now, stale_lock_s=60, hostname="me") is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = LockOwner(host="me", pid=dead.pid, acquired_at=now, heartbeat_at=now)
    reason = stale_reason(gone, lock_mtime=now, now=now, stale_lock_s=60, hostname="me")
    assert reason and "no longer running" in reason
    # A live process whose start time differs from the record's: the holder exited and the pid was reused.
    parent = os.getppid()
    ticks = pid_start_ticks(parent)
    assert ticks is not None
    recycled = LockOwner(host="me", pid=parent, acquired_at=now, heartbeat_at=now, pid_start_ticks=ticks + 1)
    reason = stale_reason(recycled, lock_mtime=now, now=now, stale_lock_s=60, hostname="me")
    assert reason and "the pid was reused" in reason
    same = LockOwner(host="me", pid=parent, acquired_at=now, heartbeat_at=now, pid_start_ticks=ticks)
    assert stale_reason(same, lock_mtime=now, now=now, stale_lock_s=60, hostname="me") is None
    # No owner record: a fresh marker is a holder about to write one; an old one is abandoned.
    assert stale_reason(None, lock_mtime=now - 5, now=now, stale_lock_s=60, hostname="me") is None
    assert stale_reason(None, lock_mtime=now - 120, now=now, stale_lock_s=60, hostname="me")


def test_the_holder_refreshes_its_heartbeat(tmp_path: Path) -> None:
    lock = VolumeLock(tmp_path / ".lock", stale_lock_s=0.2)  # a beat every 0.05 s
    with lock:
        first = lock.owner()
        assert first is not None and first.heartbeat_at is not None
        deadline = time.monotonic() + 30
        while (now := lock.owner()) is not None and now.heartbeat_at == first.heartbeat_at:
            assert time.monotonic() < deadline, "the heartbeat never advanced"
            time.sleep(0.02)
        assert now is not None and now.acquired_at == first.acquired_at
        assert now.heartbeat_at is not None and now.heartbeat_at > first.heartbeat_at  # type: ignore[operator]


def test_release_never_removes_a_marker_a_peer_made_after_breaking_ours(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / ".lock"
    ours = VolumeLock(path).acquire()
    # A peer judged us stale (say our host froze past the heartbeat timeout) and took over.
    path.unlink()
    peer = VolumeLock(path).acquire(timeout_s=0)
    assert not ours.is_held() and peer.is_held()
    with caplog.at_level(logging.ERROR):
        ours.release()
    assert "was broken by another worker" in caplog.text
    assert path.exists() and peer.is_held()
    peer.release()
    assert not path.exists()


def test_the_lock_is_not_reentrant(tmp_path: Path) -> None:
    with VolumeLock(tmp_path / ".lock") as lock:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            lock.acquire()
        with pytest.raises(LockHeld):
            VolumeLock(tmp_path / ".lock").acquire(timeout_s=0)  # the same process, another holder object
