"""The local endpoint's worker: the environment RunPod gives one, and a supervisor that runs the
production `python handler.py` against the endpoint and restarts it when it dies."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type hints only: local_endpoint imports this module, so importing it here would loop
    from lora_worker.tools.local_endpoint import LocalEndpoint

log = logging.getLogger(__name__)

# runpod SDK 1.12 pings every RUNPOD_PING_INTERVAL ms (default 10000); loopback can afford more often,
# which lets a dead worker's job be requeued sooner.
WORKER_PING_INTERVAL_MS = 2000


def worker_env(
    base_url: str, endpoint_id: str, worker_id: str, volume_dir: str | Path | None = None
) -> dict[str, str]:
    """The environment RunPod gives a worker, pointed at a local endpoint (merge onto os.environ).

    `$ID` and `$RUNPOD_POD_ID` are left for the SDK to fill in, as on RunPod; the `?gpu=` query is
    there because the SDK appends its own parameters with `&`.
    """
    env = {
        "RUNPOD_WEBHOOK_GET_JOB": f"{base_url}/job-take/$ID?gpu=local",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base_url}/job-done/$RUNPOD_POD_ID/$ID?gpu=local",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{base_url}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local",
        "RUNPOD_WEBHOOK_PING": f"{base_url}/ping/$RUNPOD_POD_ID?gpu=local",
        "RUNPOD_PING_INTERVAL": str(WORKER_PING_INTERVAL_MS),
        "RUNPOD_AI_API_KEY": "local-endpoint-dummy-key",  # the SDK only pings when some key is set
        "RUNPOD_POD_ID": worker_id,
        "RUNPOD_ENDPOINT_ID": endpoint_id,
        # The SDK's start-up system checks include a TCP connect to 8.8.8.8:53, which fails offline
        # and says nothing about a laptop; the GPU checks still run where there is a GPU.
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "PYTHONUNBUFFERED": "1",
    }
    if volume_dir is not None:
        env["VOLUME_DIR"] = str(Path(volume_dir).absolute())
    return env


def default_handler_path() -> Path:
    """handler.py at the repository root (src/lora_worker/tools/ -> repo), else in the current directory."""
    repo_handler = Path(__file__).resolve().parents[3] / "handler.py"
    return repo_handler if repo_handler.is_file() else Path("handler.py").absolute()


class WorkerSupervisor:
    """Runs `python handler.py` in production mode against the endpoint; restarts it if it dies."""

    # Give up after this many exits within FAST_EXIT_S of starting: it is broken, not unlucky.
    MAX_FAST_EXITS = 3
    FAST_EXIT_S = 20.0

    def __init__(self, endpoint: LocalEndpoint, *, handler: Path, cwd: Path, volume_dir: Path):
        self.endpoint, self.handler, self.cwd, self.volume_dir = endpoint, handler, cwd, volume_dir
        self.proc: subprocess.Popen | None = None
        self.worker_id = ""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        # A fresh pod id per process: the endpoint can tell the new worker from the dead one.
        self.worker_id = f"local-worker-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, **self.endpoint.worker_env(self.worker_id, self.volume_dir)}
        env.setdefault("RUNPOD_LOG_LEVEL", "INFO")  # the SDK defaults to DEBUG: a line per second when idle
        log.info("starting worker %s: %s %s (cwd %s)", self.worker_id, sys.executable, self.handler, self.cwd)
        # Own session: Ctrl-C on the endpoint's terminal does not reach it; stop() ends its whole group.
        return subprocess.Popen(
            [sys.executable, "-u", str(self.handler)], cwd=self.cwd, env=env, start_new_session=True
        )

    def _run(self) -> None:
        fast_exits = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            self.proc = self._spawn()
            code = self.proc.wait()
            _kill_group(self.proc)  # its ping process outlives it otherwise, and would keep it "alive"
            if self._stopping.is_set():
                return
            self.endpoint.state.worker_gone(self.worker_id)
            fast_exits = fast_exits + 1 if time.monotonic() - started < self.FAST_EXIT_S else 0
            if fast_exits >= self.MAX_FAST_EXITS:
                log.error(
                    "worker exited %d times right after starting (last code %s); not restarting",
                    fast_exits,
                    code,
                )
                return
            log.warning("worker %s exited with code %s; restarting in 2 s", self.worker_id, code)
            self._stopping.wait(2.0)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after grace_s: the SDK drains a running job on SIGTERM, which for a
        training job could take hours, and a checkpointed job resumes when it runs again."""
        self._stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
        _kill_group(proc)
        proc.wait()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the worker's process group, as stopping a container does."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
