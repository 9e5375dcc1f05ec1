"""Progress to RunPod's `/status`: one ordered sender, drained before the job's result goes out.

The runpod SDK's `progress_update` starts a new thread per call and returns at once, with no way
to wait for it, so two updates can arrive out of order and one can arrive after the job's result,
overwriting it in `/status`. This channel makes the same HTTP call the SDK's worker makes to
the platform (`POST` to the job-done URL the platform gives every worker in
`RUNPOD_WEBHOOK_POST_OUTPUT`, body `{"status": "IN_PROGRESS", "output": <event>}`), one update at
a time on its own thread, waiting for each answer; progress superseded by a newer update is
skipped, and `close()` waits (bounded) for the last send before the result is returned.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from lora_worker import __version__
from lora_worker.runtime.files import dumps_strict
from lora_worker.runtime.net import backoff_s, scrub

log = logging.getLogger(__name__)

# Attempts per update and the wait between them (seconds): as the SDK's own sender, three tries.
ATTEMPTS = 3
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 4.0
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RunPodTarget:
    """Where progress goes: the platform's job-done URL template and the worker's credentials."""

    url_template: str  # RUNPOD_WEBHOOK_POST_OUTPUT, with $ID (job) and $RUNPOD_POD_ID (worker)
    pod_id: str
    api_key: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RunPodTarget | None:
        """The target RunPod configures in the worker's environment, or None (local test mode)."""
        env = os.environ if env is None else env
        template = env.get("RUNPOD_WEBHOOK_POST_OUTPUT")
        if not template:
            return None
        # The SDK uses a random id when the platform gives none; the URL must still be well formed.
        pod_id = env.get("RUNPOD_POD_ID") or str(uuid.uuid4())
        return cls(template, pod_id, env.get("RUNPOD_AI_API_KEY", ""))

    def url(self, job_id: str) -> str:
        return (
            self.url_template.replace("$RUNPOD_POD_ID", self.pod_id).replace("$ID", job_id)
            + "&isStream=false"
        )


def post_progress(
    target: RunPodTarget,
    job_id: str,
    payload: Mapping[str, Any],
    *,
    session: requests.Session,
    timeout_s: float = TIMEOUT_S,
) -> None:
    """One progress update, as the SDK's worker sends it; raises requests errors, HTTPError on non-2xx."""
    body = dumps_strict({"status": "IN_PROGRESS", "output": payload}, indent=None).encode("utf-8")
    response = session.post(
        target.url(job_id),
        data=body,
        headers={
            "Authorization": target.api_key,
            # The platform reads this body as JSON whatever the type says; the SDK sends it so.
            "Content-Type": "application/x-www-form-urlencoded",
            "charset": "utf-8",
            "X-Request-ID": job_id,
            "User-Agent": f"lora-worker/{__version__}",
        },
        timeout=timeout_s,
    )
    try:
        response.raise_for_status()
    finally:
        response.close()


Send = Callable[[str, Mapping[str, Any], float], None]  # (job_id, payload, timeout_s); raises on failure


class RunPodChannel:
    """Sends each event to RunPod's `/status` from one ordered background thread.

    `send(job_id, payload, timeout_s)` (injectable; default `post_progress` to
    `RunPodTarget.from_env()`, nothing at all in local test mode) runs on the channel's thread, one
    call at a time, and returns once the update is delivered or raises. Failed calls are retried
    (`attempts`, backoff via `sleep`); only the newest waiting update is sent, since `/status` shows
    one state. `close(timeout_s)` waits for the last one; no attempt starts or outlives its deadline
    (a request's timeout is cut to it), so nothing of ours lands after the result the SDK posts next.
    """

    def __init__(
        self,
        job: Mapping[str, Any],
        send: Send | None = None,
        *,
        target: RunPodTarget | None = None,
        attempts: int = ATTEMPTS,
        sleep: Callable[[float], Any] = time.sleep,
    ):
        self.job_id = str(job["id"])
        if send is None:
            target = target or RunPodTarget.from_env()
            send = _http_send(target) if target else None
        self._send = send
        self._attempts, self._sleep = attempts, sleep
        self._cond = threading.Condition()
        self._pending: deque[Mapping[str, Any]] = deque()
        self._closed = False
        self._deadline: float | None = None  # time.monotonic() after which no attempt starts
        self._thread = threading.Thread(target=self._run, name="runpod-progress", daemon=True)
        self._thread.start()

    def send(self, event: Mapping[str, Any], *, kind: str = "progress") -> None:
        # Every event goes to /status; `kind` matters to webhooks (retries), not here.
        with self._cond:
            if not self._closed:
                self._pending.append(event)
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return  # closed and drained
                item = self._pending[-1]  # only the newest waiting update matters for /status
                self._pending.clear()
            self._deliver(item)

    def _deliver(self, event: Mapping[str, Any]) -> None:
        if self._send is None:
            return  # local test mode: there is no /status to update
        for attempt in range(1, self._attempts + 1):
            timeout_s = self._time_left()
            if timeout_s <= 0:
                log.warning("runpod progress update not sent: the channel's close deadline passed")
                return
            try:
                self._send(self.job_id, event, timeout_s)
                return
            except Exception as err:  # progress is best-effort; the result path is separate
                detail = scrub(f"{type(err).__name__}: {err}")[:300]
                with self._cond:
                    newer = bool(self._pending)
                if attempt == self._attempts or newer:  # a newer update supersedes this one
                    log.warning("runpod progress update failed (attempt %d): %s", attempt, detail)
                    return
                self._sleep(
                    max(0.0, min(backoff_s(attempt, BACKOFF_BASE_S, BACKOFF_MAX_S), self._time_left()))
                )

    def _time_left(self) -> float:
        with self._cond:
            deadline = self._deadline
        return TIMEOUT_S if deadline is None else min(TIMEOUT_S, deadline - time.monotonic())

    def close(self, timeout_s: float = 10.0) -> bool:
        """No more sends; wait up to `timeout_s` for the last one. False when it had to be cut off."""
        with self._cond:
            self._closed = True
            self._deadline = time.monotonic() + max(0.0, timeout_s)
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout_s) + 0.5)  # the last attempt ends by the deadline
        return not self._thread.is_alive()


def _http_send(target: RunPodTarget) -> Send:
    session = requests.Session()

    def send(job_id: str, payload: Mapping[str, Any], timeout_s: float) -> None:
        post_progress(target, job_id, payload, session=session, timeout_s=timeout_s)

    return send
