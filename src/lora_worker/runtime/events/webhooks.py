"""Signed webhooks to the dashboard, delivered in order from one background thread.

`WebhookSender.send` only enqueues, so the training loop never waits on the network. Bodies and
signatures come from `signing` (re-exported here); the contract the dashboard implements is in
docs/webhooks.md.

Newer state is never starved by older undeliverable events: a progress event is dropped as soon
as any newer event waits behind it, and a stage event stops retrying (dropped, counted, logged)
once a newer stage or final event waits behind it, since every event carries the job's whole
current state. The final event keeps its whole retry budget, bounded only by `close`'s deadline.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import requests

from lora_worker import __version__
from lora_worker.runtime.events.signing import (
    DEFAULT_TOLERANCE_S,
    WebhookVerificationError,
    encode_event,
    secret_key,
    sign_headers,
    verify,
)
from lora_worker.runtime.net import backoff_s, redact_url, retry_after_s, scrub

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "KINDS",
    "WebhookSender",
    "WebhookVerificationError",
    "encode_event",
    "secret_key",
    "sign_headers",
    "verify",
]

Kind = Literal["progress", "stage", "final"]
KINDS: tuple[str, ...] = ("progress", "stage", "final")

# Statuses worth retrying besides 5xx: request timeout and rate limiting.
RETRYABLE_STATUS = frozenset({408, 429})
# Statuses whose Retry-After header (seconds or an HTTP date) sets the next delay.
RETRY_AFTER_STATUS = frozenset({429, 503})
# Exceptions meaning the receiver may answer next time (refused/reset connection, timeout, a
# response cut off half-way); anything else from requests (bad URL, bad header) will not improve.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
# While `close` waits, a backoff is shortened so that one more attempt starts this many seconds
# before the deadline instead of being cut off by it.
LAST_TRY_MARGIN_S = 1.0


@dataclass(frozen=True)
class _Pending:
    kind: str
    msg_id: str
    body: bytes
    label: str  # the event's stage (or status), for log lines only


class WebhookSender:
    """Delivers events to one URL, in order, from one background daemon thread.

    Stage and final events get `final_attempts` tries with exponential backoff from
    `final_backoff_s` (capped at `max_backoff_s`; with the defaults 8 tries over about 3 minutes).
    Progress events get `progress_attempts` tries. Superseded progress and stage events are
    dropped (see the module docstring). `timeout_s` bounds each attempt's connect and each read
    (seconds). `sleep` is injectable for tests; the default `time.sleep` is replaced by a wait that
    a newer event or `close` cuts short. `clock` (unix seconds) stamps `webhook-timestamp`.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout_s: float = 10,
        final_attempts: int = 8,
        final_backoff_s: float = 2.0,
        max_backoff_s: float = 60.0,
        progress_attempts: int = 2,
        log: logging.Logger | None = None,
        sleep: Callable[[float], Any] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook URL must look like http(s)://host/path")
        if final_attempts < 1 or progress_attempts < 1:
            raise ValueError("final_attempts and progress_attempts must be at least 1")
        secret_key(secret)  # fail at start-up, not on the first event, if the secret is malformed
        self._url = url
        self._secret = secret
        # Logged instead of the URL: a query string or user:password in it may be a credential.
        self._target = redact_url(url).split("://", 1)[-1]
        self._secrets = (url, secret, parts.password)
        self._timeout_s = timeout_s
        self._final_attempts = final_attempts
        self._progress_attempts = progress_attempts
        self._final_backoff_s = final_backoff_s
        self._max_backoff_s = max_backoff_s
        self._log = log or logging.getLogger(__name__)
        self._sleep = sleep
        self._clock = clock

        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._busy = False  # the thread holds an event (sending it or waiting to retry it)
        self._closed = False  # close() called: no new events
        self._deadline: float | None = None  # time.monotonic() by which close() gives up
        self._abandoned = False  # close() gave up: stop retrying
        self._stats = {"delivered": 0, "failed": 0, "dropped": 0}
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
        self._thread.start()

    # -- caller side ------------------------------------------------------------------------

    def send(self, event: Mapping[str, Any], *, kind: Kind) -> str:
        """Queue `event` for delivery and return its webhook-id; never blocks on the network.

        The body is serialised now, so later changes to `event` do not leak into it. After
        `close` the event is not sent: it is logged and counted as failed.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        label = str(event.get("stage") or event.get("status"))[:40]
        item = _Pending(kind, f"msg_{uuid.uuid4().hex}", encode_event(event), label)
        with self._cond:
            if self._closed:
                self._stats["failed"] += 1
                self._log.warning(
                    "webhook %s %s %s (%s): not sent, sender already closed",
                    self._target,
                    item.kind,
                    item.label,
                    item.msg_id,
                )
                return item.msg_id
            self._queue.append(item)
            self._cond.notify_all()
        return item.msg_id

    def stats(self) -> dict[str, int]:
        """Counts so far: `delivered` (2xx), `failed` (gave up), `dropped` (superseded)."""
        with self._cond:
            return dict(self._stats)

    def close(self, timeout_s: float) -> bool:
        """Stop accepting events and wait up to `timeout_s` seconds in all for the queue to drain.

        Returns True when everything queued was delivered, dropped or definitively failed. On
        timeout, gives up: queued events count as failed, retries stop, and False is returned; an
        attempt already in flight may still finish (bounded by the deadline per read) on the
        daemon thread, which never blocks interpreter exit.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._cond:
            self._closed = True
            self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._cond.notify_all()
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            undelivered = len(self._queue) + int(self._busy)
            if undelivered:
                self._stats["failed"] += len(self._queue)
                self._queue.clear()
                self._abandoned = True
                self._cond.notify_all()
                self._log.error(
                    "webhook %s: gave up after %.1f s with %d event(s) undelivered",
                    self._target,
                    timeout_s,
                    undelivered,
                )
        if not undelivered:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        return undelivered == 0

    # -- delivery thread --------------------------------------------------------------------

    def _run(self) -> None:
        session = requests.Session()
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue:
                        return  # closed and drained (or abandoned)
                    item = self._queue.popleft()
                    if item.kind == "progress" and self._queue:
                        self._stats["dropped"] += 1
                        self._log.debug(
                            "webhook %s progress %s (%s): dropped, superseded by a newer event",
                            self._target,
                            item.label,
                            item.msg_id,
                        )
                        self._cond.notify_all()
                        continue
                    self._busy = True
                outcome = "failed"
                try:
                    outcome = self._deliver(session, item)
                except Exception as exc:  # a bug here must not kill the thread and stall the queue
                    self._log.error(
                        "webhook %s %s %s (%s): internal error %s",
                        self._target,
                        item.kind,
                        item.label,
                        item.msg_id,
                        type(exc).__name__,
                    )
                finally:
                    with self._cond:
                        self._busy = False
                        self._stats[outcome] += 1
                        self._cond.notify_all()
        finally:
            session.close()

    def _deliver(self, session: requests.Session, item: _Pending) -> str:
        """Try `item` until delivered, superseded or out of attempts; returns the stats key."""
        attempts = self._progress_attempts if item.kind == "progress" else self._final_attempts
        where = f"webhook {self._target} {item.kind} {item.label} ({item.msg_id})"
        for attempt in range(1, attempts + 1):
            if self._is_abandoned():
                self._log.error("%s: not delivered, sender closed before attempt %d", where, attempt)
                return "failed"
            ok, retryable, detail, wait_s = self._attempt(session, item)
            if ok:
                log = self._log.debug if item.kind == "progress" else self._log.info
                log("%s: delivered, attempt %d/%d, %s", where, attempt, attempts, detail)
                return "delivered"
            if not retryable:
                self._log.error(
                    "%s: failed, attempt %d/%d, %s (not retried)", where, attempt, attempts, detail
                )
                return "failed"
            if attempt == attempts:
                self._log.error("%s: failed, attempt %d/%d, %s (giving up)", where, attempt, attempts, detail)
                return "failed"
            if self._superseded(item):
                return self._dropped(where, attempt, detail)
            if wait_s is None:
                wait_s = backoff_s(attempt, self._final_backoff_s, self._max_backoff_s)
            wait_s = min(wait_s, self._max_backoff_s)
            if self._sleep is time.sleep:  # an injected sleep runs on a fake clock: no real deadline
                wait_s = self._before_deadline(wait_s)
            self._log.warning(
                "%s: attempt %d/%d, %s; retrying in %.2f s", where, attempt, attempts, detail, wait_s
            )
            self._pause(wait_s, item)
            if self._superseded(item):
                return self._dropped(where, attempt, detail)
        raise AssertionError("unreachable: the last attempt always returns")

    def _attempt(self, session: requests.Session, item: _Pending) -> tuple[bool, bool, str, float | None]:
        """One POST: (delivered, worth retrying, what happened, Retry-After seconds or None)."""
        # Re-stamped per attempt, so a long backoff never pushes a retry outside the receiver's
        # 5-minute window; the webhook-id stays, letting the receiver de-duplicate.
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"lora-worker/{__version__}",
            **sign_headers(self._secret, item.msg_id, int(self._clock()), item.body),
        }
        try:
            response = session.post(
                self._url,
                data=item.body,
                headers=headers,
                timeout=self._attempt_timeout_s(),
                # A redirected POST would be resent as a GET without the signed body.
                allow_redirects=False,
            )
        except RETRYABLE_ERRORS as exc:
            return False, True, self._describe(exc), None
        except requests.RequestException as exc:
            return False, False, self._describe(exc), None
        code = response.status_code
        response.close()
        wait_s = None
        if code in RETRY_AFTER_STATUS:
            wait_s = retry_after_s(response.headers.get("Retry-After"), self._clock())
        retryable = code >= 500 or code in RETRYABLE_STATUS
        return 200 <= code < 300, retryable, f"HTTP {code}", wait_s

    def _superseded(self, item: _Pending) -> bool:
        """A newer event makes `item` not worth retrying: anything after a progress event, a stage
        or final event after a stage event; nothing supersedes the final event."""
        with self._cond:  # re-entrant: also called with the lock held, from _pause
            if item.kind == "progress":
                return bool(self._queue)
            if item.kind == "stage":
                return any(newer.kind != "progress" for newer in self._queue)
            return False

    def _dropped(self, where: str, attempt: int, detail: str) -> str:
        self._log.warning(
            "%s: dropped after attempt %d (%s), superseded by a newer event waiting behind it",
            where,
            attempt,
            detail,
        )
        return "dropped"

    def _is_abandoned(self) -> bool:
        with self._cond:
            return self._abandoned

    def _before_deadline(self, wait_s: float) -> float:
        # While close() waits, the last retry starts just before its deadline rather than after.
        with self._cond:
            deadline = self._deadline
        if deadline is None:
            return wait_s
        room = deadline - time.monotonic() - LAST_TRY_MARGIN_S
        return min(wait_s, room) if room > 0 else wait_s

    def _attempt_timeout_s(self) -> float:
        # While close() is waiting, an attempt may not outlive its deadline by much.
        with self._cond:
            deadline = self._deadline
        if deadline is None:
            return self._timeout_s
        return max(0.5, min(self._timeout_s, deadline - time.monotonic()))

    def _pause(self, seconds: float, item: _Pending) -> None:
        """Wait before a retry; a real wait ends early when close() gives up or a newer event
        supersedes `item`. An injected `sleep` is called as is (tests advance a fake clock)."""
        if self._sleep is not time.sleep:
            self._sleep(seconds)
            return
        with self._cond:
            self._cond.wait_for(lambda: self._abandoned or self._superseded(item), timeout=seconds)

    def _describe(self, exc: BaseException) -> str:
        """Exception class and message, with the URL, its query, any password and the secret removed."""
        return f"{type(exc).__name__}: {scrub(str(exc), *self._secrets)[:300]}"
