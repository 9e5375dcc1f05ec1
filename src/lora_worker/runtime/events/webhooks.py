"""Signed webhooks to the dashboard: Standard Webhooks signatures plus the seed dashboard's hex HMAC.

Every request carries two signatures over the exact body bytes sent:

* `webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64>`, the
  HMAC-SHA256 of `"{id}.{timestamp}.{body}"` as the Standard Webhooks spec defines it. The key is
  the base64-decoded part of a `whsec_<base64>` secret, or a raw secret's UTF-8 bytes.
* `X-Webhook-Signature: <hex>`, the HMAC-SHA256 of the body alone, keyed with the secret *string
  as configured* (the whole `WEBHOOK_SECRET` text, `whsec_` prefix included), because that is what
  the seed dashboard's `crypto.createHmac('sha256', process.env.WEBHOOK_SECRET)` computes.

`sign_headers`, `encode_event` and `verify` are pure functions; `WebhookSender` delivers events on
one background thread so the training loop never waits on the network. The contract the dashboard
implements is in docs/webhooks.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import requests

from lora_worker import __version__

Kind = Literal["progress", "stage", "final"]
KINDS: tuple[str, ...] = ("progress", "stage", "final")

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300  # Standard Webhooks' recommended replay window: 5 minutes, either side.
# Headers `verify` requires (lower-case; lookup is case-insensitive).
REQUIRED_HEADERS: tuple[str, ...] = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-webhook-signature",
)
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


class WebhookVerificationError(Exception):
    """A webhook failed verification; the message says which check failed (never a secret)."""


# --------------------------------------------------------------------------------------------
# Pure signing and verification


def secret_key(secret: str) -> bytes:
    """HMAC key for the `webhook-signature` header: base64-decoded for `whsec_...`, else UTF-8.

    Raises ValueError (without echoing the secret) for an empty secret or bad base64.
    """
    if not secret:
        raise ValueError("webhook secret is empty")
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("webhook secret starts with 'whsec_' but the rest is not valid base64") from None
        if not key:
            raise ValueError("webhook secret 'whsec_' has an empty key")
        return key
    return secret.encode("utf-8")


def _v1_signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    # The timestamp goes in as the header's text, so a verifier signs exactly what it received.
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def _hex_signature(secret: str, body: bytes) -> str:
    # Keyed with the configured string itself (not the decoded whsec_ key): the dashboard's
    # createHmac('sha256', process.env.WEBHOOK_SECRET) uses the env var's UTF-8 bytes.
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def sign_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The four signature headers for one delivery attempt of `body` (the exact bytes sent).

    `timestamp` is unix seconds. Content-Type is not included; the sender adds it.
    """
    ts = str(int(timestamp))
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + _v1_signature(secret_key(secret), msg_id, ts, body),
        "X-Webhook-Signature": _hex_signature(secret, body),
    }


def _same(a: str, b: str) -> bool:
    # compare_digest on bytes: constant time, and no TypeError for non-ASCII header text.
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> None:
    """Accept a webhook only if both signatures match and its timestamp is within `tolerance_s`.

    `headers` names are matched case-insensitively; `body` must be the raw bytes received (not
    re-serialised JSON). `now` is unix seconds (default: the current time). `webhook-signature`
    may hold several space-separated entries (e.g. during secret rotation); any `v1,` entry may
    match, other versions are ignored. Raises WebhookVerificationError saying which check failed.
    """
    lowered = {str(name).lower(): value for name, value in headers.items()}
    missing = [name for name in REQUIRED_HEADERS if not lowered.get(name)]
    if missing:
        raise WebhookVerificationError(f"missing header(s): {', '.join(missing)}")
    msg_id = lowered["webhook-id"]
    ts_text = lowered["webhook-timestamp"].strip()
    if not (ts_text.isascii() and ts_text.isdigit()):
        raise WebhookVerificationError(
            f"webhook-timestamp {ts_text[:32]!r} is not an integer number of unix seconds"
        )
    now = time.time() if now is None else now
    age_s = now - int(ts_text)
    if age_s > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {age_s:.0f} s old, outside the {tolerance_s} s window (stale or replayed)"
        )
    if -age_s > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {-age_s:.0f} s in the future, outside the {tolerance_s} s window (clock skew?)"
        )

    expected_v1 = _v1_signature(secret_key(secret), msg_id, ts_text, body)
    entries = lowered["webhook-signature"].split()
    if not any(
        version == "v1" and _same(signature, expected_v1)
        for version, _, signature in (entry.partition(",") for entry in entries)
    ):
        raise WebhookVerificationError(
            "webhook-signature: no v1 signature matches "
            "(wrong secret, or the body, webhook-id or webhook-timestamp was changed)"
        )
    if not _same(lowered["x-webhook-signature"].strip().lower(), _hex_signature(secret, body)):
        raise WebhookVerificationError(
            "X-Webhook-Signature does not match (wrong secret, or the body was changed; it is keyed "
            "with the full secret string, whsec_ prefix included)"
        )


def _json_safe(value: Any) -> Any:
    """Plain JSON values: NaN/inf (a diverged loss) become null, since JavaScript's JSON.parse
    rejects them; numpy/torch scalars become numbers; paths and other objects become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _json_safe(item())
        except (TypeError, ValueError):  # e.g. a multi-element array: fall through to str
            pass
    return str(value)


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The request body: compact, key-sorted, ASCII JSON of `event` (the bytes that get signed)."""
    return json.dumps(_json_safe(event), separators=(",", ":"), sort_keys=True, allow_nan=False).encode(
        "ascii"
    )


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date; `now` in unix
    seconds), or None when absent or unparseable. Not capped here; the sender caps it."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        return max(0.0, when.timestamp() - now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay after failed attempt number `attempt` (1-based): base_s, 2*base_s, 4*base_s, ... capped
    at max_s. No jitter: one worker sends one job's events, so there is no herd to spread out."""
    return min(max_s, base_s * 2 ** (attempt - 1))


# --------------------------------------------------------------------------------------------
# Delivery


@dataclass(frozen=True)
class _Pending:
    kind: str
    msg_id: str
    body: bytes
    status: str  # the event's status, for log lines only


class WebhookSender:
    """Delivers events to one URL, in order, from one background daemon thread.

    `send` only enqueues. Stage and final events get `final_attempts` tries with exponential
    backoff from `final_backoff_s` (capped at `max_backoff_s`; with the defaults 8 tries over about
    3 minutes). Progress events get `progress_attempts` tries and are dropped unsent when a newer
    event is waiting behind them. `timeout_s` bounds each attempt's connect and each read (seconds).
    `sleep` is injectable for tests; the default `time.sleep` is replaced by a wait that `close`
    can cut short. `clock` (unix seconds) stamps `webhook-timestamp`.
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
        # Logged instead of the URL: host and path only, since a query string or user:password
        # in the URL may itself be a credential.
        self._target = f"{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path or '/'}"
        self._scrub = [s for s in (url, parts.query, parts.password, secret) if s]
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
        self._abandoned = threading.Event()  # close() gave up: stop retrying, wake any backoff
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
        item = _Pending(kind, f"msg_{uuid.uuid4().hex}", encode_event(event), str(event.get("status"))[:40])
        with self._cond:
            if self._closed:
                self._stats["failed"] += 1
                self._log.warning(
                    "webhook %s %s %s (%s): not sent, sender already closed",
                    self._target,
                    item.kind,
                    item.status,
                    item.msg_id,
                )
                return item.msg_id
            self._queue.append(item)
            self._cond.notify_all()
        return item.msg_id

    def stats(self) -> dict[str, int]:
        """Counts so far: `delivered` (2xx), `failed` (gave up), `dropped` (superseded progress)."""
        with self._cond:
            return dict(self._stats)

    def close(self, timeout_s: float) -> bool:
        """Stop accepting events and wait up to `timeout_s` seconds in all for the queue to drain.

        Returns True when everything queued was delivered, dropped or definitively failed. On
        timeout, gives up: queued events count as failed, retries stop, and False is returned; an
        attempt already in flight may still finish (bounded by `timeout_s` per read) on the daemon
        thread, which never blocks interpreter exit.
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
                self._abandoned.set()
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
                            item.status,
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
                        item.status,
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
        """Try `item` until delivered or out of attempts; returns the stats key for the outcome."""
        attempts = self._progress_attempts if item.kind == "progress" else self._final_attempts
        where = f"webhook {self._target} {item.kind} {item.status} ({item.msg_id})"
        for attempt in range(1, attempts + 1):
            if self._abandoned.is_set():
                self._log.error("%s: not delivered, sender closed before attempt %d", where, attempt)
                return "failed"
            # Re-stamped per attempt, so a long backoff never pushes a retry outside the
            # receiver's 5-minute window; the webhook-id stays, letting the receiver de-duplicate.
            headers = {
                "Content-Type": "application/json",
                "User-Agent": f"lora-worker/{__version__}",
                **sign_headers(self._secret, item.msg_id, int(self._clock()), item.body),
            }
            wait_s: float | None = None
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
                retryable, detail = True, self._describe(exc)
            except requests.RequestException as exc:
                retryable, detail = False, self._describe(exc)
            else:
                code = response.status_code
                response.close()
                if 200 <= code < 300:
                    log = self._log.debug if item.kind == "progress" else self._log.info
                    log("%s: delivered, attempt %d/%d, HTTP %d", where, attempt, attempts, code)
                    return "delivered"
                retryable = code >= 500 or code in RETRYABLE_STATUS
                detail = f"HTTP {code}"
                if code in RETRY_AFTER_STATUS:
                    wait_s = retry_after_s(response.headers.get("Retry-After"), self._clock())
            if not retryable:
                self._log.error(
                    "%s: failed, attempt %d/%d, %s (not retried)", where, attempt, attempts, detail
                )
                return "failed"
            if attempt == attempts:
                self._log.error("%s: failed, attempt %d/%d, %s (giving up)", where, attempt, attempts, detail)
                return "failed"
            if wait_s is None:
                wait_s = backoff_s(attempt, self._final_backoff_s, self._max_backoff_s)
            wait_s = min(wait_s, self._max_backoff_s)
            self._log.warning(
                "%s: attempt %d/%d, %s; retrying in %.2f s", where, attempt, attempts, detail, wait_s
            )
            self._pause(wait_s)
            if item.kind == "progress" and self._newer_waiting():
                self._log.debug("%s: dropped after attempt %d, superseded by a newer event", where, attempt)
                return "dropped"
        raise AssertionError("unreachable: the last attempt always returns")

    def _attempt_timeout_s(self) -> float:
        # While close() is waiting, an attempt may not outlive its deadline by much.
        with self._cond:
            deadline = self._deadline
        if deadline is None:
            return self._timeout_s
        return max(0.5, min(self._timeout_s, deadline - time.monotonic()))

    def _pause(self, seconds: float) -> None:
        if self._sleep is time.sleep:
            self._abandoned.wait(seconds)  # returns early when close() gives up
        else:
            self._sleep(seconds)

    def _newer_waiting(self) -> bool:
        with self._cond:
            return bool(self._queue)

    def _describe(self, exc: BaseException) -> str:
        """Exception class and message, with the URL, its query, any password and the secret removed."""
        text = str(exc)
        for value in self._scrub:
            text = text.replace(value, "<redacted>")
        return f"{type(exc).__name__}: {text[:300]}"
