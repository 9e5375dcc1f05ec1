"""The network rules every stage shares: which URLs are allowed, how secrets are kept out of text,
and how long to wait before trying again.

One implementation each, used by the dataset download, webhooks, uploads and the Hub client.
"""

from __future__ import annotations

import ipaddress
import math
import re
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit, urlunsplit

# Query parameters that carry credentials in presigned URLs (S3/R2 SigV4 and SigV2, GCS V4,
# Supabase `token`, Azure SAS `sig`): a second line of defence after the whole query is cut.
_SECRET_PARAM = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential|"
    r"Signature|AWSAccessKeyId|token|sig)=[^&\s'\"<>]*"
)
_QUERY_IN_TEXT = re.compile(r"\?[^\s'\"<>]*")


class UrlNotAllowed(ValueError):
    """A URL the worker will not fetch or post to; the message says why."""


def is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_loopback_http: bool = True) -> str:
    """The URL itself when it is https (or plain http to a loopback host, for local runs and tests).

    Applied to every URL the worker is given and to every redirect hop it would follow, so a
    redirect cannot lead anywhere a URL given directly could not.
    """
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if allow_loopback_http and parts.scheme == "http" and is_loopback(parts.hostname):
        return url
    raise UrlNotAllowed("must be an https:// URL")


def redact_url(url: str) -> str:
    """The URL without user info, query string or fragment: presigned URLs carry their signature
    in the query, and a URL's user:password is a credential."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def scrub(text: str, *secrets: str | None) -> str:
    """`text` safe to log or return: each given secret (a token, a whole URL, a query string)
    replaced, any query string and any credential-looking parameter redacted."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
        query = urlsplit(secret).query if "://" in secret else ""
        if query:
            text = text.replace(query, "<redacted>")
    text = _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=<redacted>", text)
    return _QUERY_IN_TEXT.sub("?<redacted>", text)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay after failed attempt number `attempt` (1-based): base_s, 2*base_s, 4*base_s, ... capped
    at max_s. No jitter: one worker sends one job's requests, so there is no herd to spread out."""
    return min(max_s, base_s * 2 ** (attempt - 1))


def retry_after_s(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date; `now` in unix
    seconds), or None when absent or unparseable. Callers cap it."""
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
