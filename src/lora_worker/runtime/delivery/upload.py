"""Delivery of a job's archive beyond the volume: a presigned-URL upload and a Hub push.

Delivery failures never raise: they come back as `{"ok": False, "error": ...}` so the caller can
report them while the adapter stays safe on the volume. Secrets never appear in what is returned
or logged: presigned URLs lose their query string (it holds the signature), Hub tokens are
scrubbed from error text.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import requests
from huggingface_hub import HfApi

from lora_worker.runtime.files import digest_file
from lora_worker.runtime.net import backoff_s as net_backoff_s
from lora_worker.runtime.net import redact_url, retry_after_s, scrub

# Statuses worth another try: timeouts and throttling (408, 429) and server-side faults (5xx).
# Other 4xx mean the URL itself is bad (expired, wrong signature, wrong bucket): retrying cannot help.
RETRY_STATUSES = frozenset({408, 429})
MAX_RETRY_AFTER_S = 60.0  # cap on a server's Retry-After, so one header cannot stall the job
CONNECT_TIMEOUT_S = 30.0  # connecting (and each socket write) to a healthy store takes well under this

_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')

logger = logging.getLogger(__name__)

Logger = Callable[[str], Any]


def _s3_error(body: str) -> str:
    """'Code: Message' from an S3/R2/GCS XML error body or a JSON error (Supabase), else ''."""
    code = re.search(r"<Code>([^<]{1,200})</Code>", body)
    message = re.search(r"<Message>([^<]{1,500})</Message>", body)
    if code or message:
        return ": ".join(m.group(1).strip() for m in (code, message) if m)
    json_message = re.search(r'"(?:message|error)"\s*:\s*"([^"]{1,500})"', body)
    return json_message.group(1) if json_message else ""


def _explain_client_error(status: int, detail: str) -> str:
    if 300 <= status < 400:
        # Not followed: the file body is already consumed, and a presigned URL for the wrong region
        # or endpoint is the usual cause (S3 answers 301/307 with the right endpoint in the body).
        hint = "the store redirected the upload; presign the URL against the bucket's own region/endpoint"
    elif status == 403:
        hint = (
            "the presigned URL was refused: it has expired, its signature does not match this request "
            "(URLs signed for a specific Content-Type need application/gzip), or it does not grant write access"
        )
    elif status == 404:
        hint = "the bucket or upload path in the presigned URL does not exist"
    elif status == 400:
        hint = "the store rejected the request (check that the URL was presigned for a PUT upload)"
    elif status == 413:
        hint = "the archive is larger than the store accepts for a single PUT"
    else:
        hint = "the store rejected the upload"
    return f"HTTP {status}: {hint}" + (f" ({detail})" if detail else "") + "; not retried"


@dataclass
class _Attempt:
    """What one PUT came to; `stop` says why retrying cannot help, None when another try may."""

    status: int | None = None
    etag: str | None = None
    etag_verified: bool | None = None
    error: str | None = None
    ok: bool = False
    stop: Literal["rejected", "unreadable"] | None = None
    retry_after_s: float | None = None  # the store's Retry-After, capped; None: use the backoff


def _etag_verified(response: requests.Response, md5_of: Callable[[], str]) -> bool | None:
    """True when the ETag is the archive's MD5, False when it differs, None when it cannot tell."""
    match = _MD5_ETAG.match(response.headers.get("ETag") or "")
    # SSE-KMS / SSE-C objects get an ETag that is not the MD5 of the body.
    encrypted = response.headers.get("x-amz-server-side-encryption", "").startswith("aws:kms") or bool(
        response.headers.get("x-amz-server-side-encryption-customer-algorithm")
    )
    if not match or encrypted:
        return None
    return match.group(1).lower() == md5_of()


def _read_response(response: requests.Response, url: str, md5_of: Callable[[], str], out: _Attempt) -> None:
    """Fill `out` from the store's answer; raises _IntegrityError when the stored MD5 differs."""
    status = out.status = response.status_code
    out.etag = response.headers.get("ETag")
    if 200 <= status < 300:
        out.etag_verified = _etag_verified(response, md5_of)
        if out.etag_verified is False:
            raise _IntegrityError(
                f"stored object's MD5 (ETag {out.etag}) differs from the archive's MD5 {md5_of()}"
            )
        out.ok = True
        return
    detail = scrub(_s3_error(response.content[:4000].decode("utf-8", "replace")), url)
    if status in RETRY_STATUSES or status >= 500:
        out.error = f"HTTP {status}" + (f" ({detail})" if detail else "")
        wait = retry_after_s(response.headers.get("Retry-After"), time.time())
        out.retry_after_s = None if wait is None else min(wait, MAX_RETRY_AFTER_S)
    else:
        out.error = _explain_client_error(status, detail)
        out.stop = "rejected"


def _put_once(path: Path, url: str, *, size: int, timeout_s: float, md5_of: Callable[[], str]) -> _Attempt:
    """One PUT of the whole file; never raises for network, store or integrity failures."""
    out = _Attempt()
    try:
        # A fresh file object per attempt: a retry must resend from byte 0. requests streams a
        # file body in blocks (never the whole archive in memory); the explicit Content-Length
        # keeps it from falling back to chunked encoding, which S3 presigned PUTs reject.
        with open(path, "rb") as body:
            response = requests.put(
                url,
                data=body,
                headers={"Content-Type": "application/gzip", "Content-Length": str(size)},
                # (connect, read) seconds; read covers the store's wait before answering a big PUT.
                timeout=(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s),
                allow_redirects=False,
            )
        with response:
            _read_response(response, url, md5_of, out)
    except _IntegrityError as exc:
        out.etag_verified, out.error = False, str(exc)
    except requests.RequestException as exc:
        out.error = f"{type(exc).__name__}: {scrub(str(exc), url)}"
    except OSError as exc:
        if not path.is_file():  # the archive vanished mid-way: nothing left to retry with
            out.error, out.stop = f"cannot read archive {path}: {exc.strerror or exc}", "unreadable"
        else:  # a socket error that escaped requests' wrapping: transient like any connection error
            out.error = f"{type(exc).__name__}: {scrub(str(exc), url)}"
    return out


def _upload_record(safe_url: str, sha256: str) -> dict[str, Any]:
    """The record upload_presigned returns, before any attempt."""
    return {
        "ok": False,
        "url": safe_url,
        "attempts": 0,
        "status": None,
        "etag": None,
        "sha256": sha256,
        "error": None,
        "etag_verified": None,
    }


def upload_presigned(
    path: Path,
    url: str,
    *,
    sha256: str,
    attempts: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 600,
    sleep: Callable[[float], Any] = time.sleep,
    log: Logger | None = None,
) -> dict:
    """PUT the file at `path` to a presigned URL, streamed from disk, with retries.

    Works for S3, Cloudflare R2 and GCS presigned/signed PUT URLs, and for Supabase Storage signed
    upload URLs (`createSignedUploadUrl`), which also take a PUT with the raw file as the body.
    Sends `Content-Type: application/gzip` (URLs presigned with a ContentType must match it).

    Retries connection errors, timeouts, 408, 429 and 5xx with exponential backoff
    (`backoff_s` * 2**n seconds, or the server's Retry-After when given, capped at 60 s), up to
    `attempts` tries in all; any other 4xx stops at once with an explanation. When the store answers
    with an ETag that is a plain MD5 (a single-part S3/R2/GCS PUT without KMS encryption), it is
    compared with the file's MD5 and a mismatch counts as a failed (retryable) attempt.

    Never raises for upload failures. Returns {"ok", "url" (query string removed, so never the
    signature), "attempts", "status", "etag", "sha256", "error", "etag_verified" (True/False, or
    None when the ETag could not be checked)}. `sha256` is the caller's digest of the file, passed
    through so the record ties the upload to the archive.
    """
    emit = log or logger.info
    safe_url = redact_url(url)
    result = _upload_record(safe_url, sha256)
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        result["error"] = f"cannot read archive {path}: {exc.strerror or exc}"
        return result
    if not safe_url.startswith(("https://", "http://")):
        result["error"] = "upload URL must be an http(s) URL"
        return result

    # Hashed at most once, and only if the store returns an MD5-shaped ETag to compare with.
    md5_of = functools.cache(lambda: digest_file(path, hashlib.md5(usedforsecurity=False)))
    attempts = max(1, int(attempts))
    for attempt in range(1, attempts + 1):
        out = _put_once(path, url, size=size, timeout_s=timeout_s, md5_of=md5_of)
        # Each attempt's outcome replaces the last one's: the record describes the final try.
        result.update(
            ok=out.ok,
            attempts=attempt,
            status=out.status,
            etag=out.etag,
            error=out.error,
            etag_verified=out.etag_verified,
        )
        if out.ok:
            emit(f"uploaded {size:,} bytes to {safe_url} (attempt {attempt}, HTTP {out.status})")
            return result
        if out.stop == "rejected":
            emit(f"upload to {safe_url} failed: {out.error}")
        if out.stop:
            return result
        if attempt < attempts:
            delay = out.retry_after_s
            if delay is None:
                delay = net_backoff_s(attempt, backoff_s, MAX_RETRY_AFTER_S)
            emit(
                f"upload to {safe_url} attempt {attempt}/{attempts} failed ({out.error}); retrying in {delay:.1f} s"
            )
            sleep(delay)
    emit(f"upload to {safe_url} failed after {attempts} attempts: {result['error']}")
    return result


class _IntegrityError(Exception):
    """The store kept bytes other than the archive's: a failed attempt, retried."""


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


def upload_to_hf_hub(
    folder: Path,
    repo_id: str,
    *,
    token: str,
    endpoint: str | None = None,
    private: bool = True,
    commit_message: str,
) -> dict:
    """Create `repo_id` (a model repo; kept if it exists, private by default) and upload `folder`.

    Never raises for upload failures. Returns {"ok", "repo_id", "url", "commit", "error"}; the
    token never appears in the error text (it is scrubbed from exception messages).
    """
    result: dict[str, Any] = {"ok": False, "repo_id": repo_id, "url": None, "commit": None, "error": None}
    folder = Path(folder)
    if not folder.is_dir():
        result["error"] = f"nothing to upload: {folder} is not a directory"
        return result
    if not token:
        result["error"] = "no Hugging Face token: set HF_TOKEN to push adapters to the Hub"
        return result
    try:
        api = HfApi(endpoint=endpoint, token=token)
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message=commit_message,
        )
        result.update(
            ok=True,
            url=str(repo_url),
            commit=getattr(commit, "oid", None),
        )
        logger.info("pushed %s to the Hub as %s (commit %s)", folder, repo_id, result["commit"])
    except Exception as exc:  # any Hub/client failure becomes a reported result, never a crash
        message = f"{type(exc).__name__}: {exc}".strip()
        result["error"] = scrub(message, token)[:2000]
        logger.warning("Hub upload of %s failed: %s", repo_id, result["error"])
    return result
