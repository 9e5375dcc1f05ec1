"""Webhook bodies and signatures: Standard Webhooks plus the studio dashboard's hex HMAC.

Every request carries two signatures over the exact body bytes sent:

* `webhook-id`, `webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64>`, the
  HMAC-SHA256 of `"{id}.{timestamp}.{body}"` as the Standard Webhooks spec defines it. The key is
  the base64-decoded part of a `whsec_<base64>` secret, or a raw secret's UTF-8 bytes.
* `X-Webhook-Signature: <hex>`, the HMAC-SHA256 of the body alone, keyed with the secret *string
  as configured* (the whole `WEBHOOK_SECRET` text, `whsec_` prefix included), because that is what
  the studio dashboard's `crypto.createHmac('sha256', process.env.WEBHOOK_SECRET)` computes.

The body is written exactly as JavaScript's `JSON.stringify(JSON.parse(body))` writes it back, so
a dashboard that signs the raw body and one that signs `JSON.stringify(payload)` of the parsed
object both compute the same HMAC. All functions here are pure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from lora_worker.runtime.files import json_safe

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300  # Standard Webhooks' recommended replay window: 5 minutes, either side.
# Headers `verify` requires (lower-case; lookup is case-insensitive).
REQUIRED_HEADERS: tuple[str, ...] = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-webhook-signature",
)
_MAX_ARRAY_INDEX = 2**32 - 2  # JavaScript lists integer-like keys up to this first, in numeric order


class WebhookVerificationError(Exception):
    """A webhook failed verification; the message says which check failed (never a secret)."""


# --------------------------------------------------------------------------------------------
# The body: JSON that JavaScript re-serialises to the same bytes


def js_number(value: float) -> str:
    """A finite float as ECMAScript's Number::toString writes it (`1e-05` -> `0.00001`,
    `100.0` -> `100`, `1e21` -> `1e+21`). Both languages print the shortest digits that round-trip;
    only where the decimal point and exponent go differs."""
    if value == 0:
        return "0"  # JSON.stringify(-0) is "0" too
    _, digits_t, exponent = Decimal(repr(abs(value))).as_tuple()
    raw = "".join(map(str, digits_t))
    digits = raw.rstrip("0")
    k, n = len(digits), int(exponent) + len(raw)  # value = 0.<digits> x 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        tail = f".{digits[1:]}" if k > 1 else ""
        text = f"{digits[0]}{tail}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return ("-" if value < 0 else "") + text


def _js_key_order(key: str) -> tuple[int, int, str]:
    # JSON.parse keeps insertion order except for array-index keys, which come first by value.
    if key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") and int(key) <= _MAX_ARRAY_INDEX:
        return (0, int(key), "")
    return (1, 0, key)


def _write(value: Any, out: list[str]) -> None:
    if value is None or isinstance(value, bool):
        out.append({None: "null", True: "true", False: "false"}[value])
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(js_number(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))  # the same escapes as JSON.stringify
    elif isinstance(value, Mapping):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_js_key_order)):
            out.append("," if i else "")
            out.append(json.dumps(key, ensure_ascii=False) + ":")
            _write(value[key], out)
        out.append("}")
    else:  # a list (json_safe has turned everything else into one of the above)
        out.append("[")
        for i, item in enumerate(value):
            out.append("," if i else "")
            _write(item, out)
        out.append("]")


def encode_event(event: Mapping[str, Any]) -> bytes:
    """The request body (the bytes that get signed): compact UTF-8 JSON with keys sorted, equal to
    `JSON.stringify(JSON.parse(body))`. NaN and infinities become null (`files.json_safe`)."""
    out: list[str] = []
    _write(json_safe(event), out)
    return "".join(out).encode("utf-8", errors="replace")  # a lone surrogate becomes "?"


# --------------------------------------------------------------------------------------------
# Signatures


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
    re-serialised JSON). `now` is unix seconds (default: the current time); a receiver checking
    later than arrival passes the arrival time. `webhook-signature` may hold several
    space-separated entries (e.g. during secret rotation); any `v1,` entry may match, other
    versions are ignored. Raises WebhookVerificationError saying which check failed.
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
