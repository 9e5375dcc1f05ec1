"""The dataset file: downloaded from `dataset_url` or checked at `dataset_path`, with its SHA-256.

A download is treated as hostile: every redirect hop is checked against the same URL rules as the
URL given (`net.check_url`), the whole download has a deadline (a server trickling bytes cannot
hold the job), a declared size over the cap is refused before the body is read, free space is
checked, and the file is written under a temporary name and renamed only when complete, so a
failure never leaves a partial file on the volume. Errors name the field and never the URL's query.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from lora_worker.runtime.data.conversation import DatasetError, PreprocessingCancelled
from lora_worker.runtime.data.hooks import OnProgress, ShouldStop
from lora_worker.runtime.files import DiskSpaceError, require_free_space, sha256_file
from lora_worker.runtime.net import UrlNotAllowed, check_url, is_loopback, redact_url, scrub

MAX_DATASET_BYTES = 1 << 30  # 1 GiB: far beyond any chat dataset; refuse rather than fill the volume
DOWNLOAD_DEADLINE_S = 600.0  # the whole download, redirects included
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0  # longest wait for any one read; the deadline bounds the total
MAX_REDIRECTS = 5
READ_BYTES = 1 << 16  # largest read; a read returns whatever has arrived
REDIRECTS = (301, 302, 303, 307, 308)


class DatasetFetchError(DatasetError):
    """The dataset file could not be fetched; the message starts with the field (`dataset_url: ...`)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.source = field
        self.problems = [message]
        ValueError.__init__(self, f"{field}: {message}")


@dataclass(frozen=True)
class FetchedDataset:
    path: Path
    sha256: str  # hex SHA-256 of the file's bytes
    size_bytes: int
    source: str  # the path, or the URL without its query (safe to log)


def fetch_dataset(
    *,
    url: str | None = None,
    path: str | Path | None = None,
    dest_dir: Path,
    volume_dir: Path | None = None,
    max_bytes: int = MAX_DATASET_BYTES,
    deadline_s: float = DOWNLOAD_DEADLINE_S,
    clock: Callable[[], float] = time.monotonic,
    on_progress: OnProgress | None = None,
    should_stop: ShouldStop | None = None,
) -> FetchedDataset:
    """The dataset file from exactly one of `url` (downloaded into `dest_dir`) and `path` (a
    relative path is also looked up under `volume_dir`). Raises DatasetFetchError, or
    PreprocessingCancelled when `should_stop()` turns True during a download."""
    if (url is None) == (path is None):
        raise DatasetFetchError("dataset_url, dataset_path", "give exactly one of them")
    if path is not None:
        return local_dataset(path, volume_dir=volume_dir, max_bytes=max_bytes)
    return download_dataset(
        url or "",
        dest_dir,
        max_bytes=max_bytes,
        deadline_s=deadline_s,
        clock=clock,
        on_progress=on_progress,
        should_stop=should_stop,
    )


def local_dataset(
    path: str | Path, *, volume_dir: Path | None = None, max_bytes: int = MAX_DATASET_BYTES
) -> FetchedDataset:
    """A dataset file on disk: it must exist, be a regular file and be at most `max_bytes`."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and volume_dir is not None and (volume_dir / p).exists():
        p = volume_dir / p
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DatasetFetchError("dataset_path", f"no such file: {path}") from None
    except OSError as err:
        raise DatasetFetchError("dataset_path", f"cannot read {path}: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DatasetFetchError("dataset_path", f"{path} is a directory, not a dataset file")
    if not stat.S_ISREG(st.st_mode):
        raise DatasetFetchError("dataset_path", f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise DatasetFetchError(
            "dataset_path", f"{path} is {_mb(st.st_size)}, more than the limit of {_mb(max_bytes)}"
        )
    return FetchedDataset(p, sha256_file(p), st.st_size, str(p))


def _mb(n: int) -> str:
    """A size for messages: decimal MB, or bytes below one MB."""
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n:,} bytes"


def _file_name(url: str) -> str:
    """A safe local name from the URL's last path segment."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", urlsplit(url).path.rsplit("/", 1)[-1]).lstrip(".")
    return name[:100] or "dataset.json"


class _Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float]):
        self.seconds, self.clock = seconds, clock
        self.end = clock() + seconds

    def left(self) -> float:
        left = self.end - self.clock()
        if left <= 0:
            raise DatasetFetchError(
                "dataset_url", f"download took longer than the {self.seconds:g} s deadline"
            )
        return left

    def timeout(self) -> tuple[float, float]:
        left = self.left()
        return min(CONNECT_TIMEOUT_S, left), min(READ_TIMEOUT_S, left)


def _open(url: str, session: requests.Session, deadline: _Deadline) -> requests.Response:
    """The final response after following at most MAX_REDIRECTS redirects, each hop checked."""
    for _hop in range(MAX_REDIRECTS + 1):
        response = session.get(url, stream=True, allow_redirects=False, timeout=deadline.timeout())
        if response.status_code not in REDIRECTS:
            if response.status_code != 200:
                response.close()
                raise DatasetFetchError("dataset_url", f"HTTP {response.status_code} from {redact_url(url)}")
            return response
        location = response.headers.get("Location")
        response.close()
        if not location:
            raise DatasetFetchError("dataset_url", f"HTTP {response.status_code} redirect without a Location")
        nxt = urljoin(url, location)
        try:
            check_url(nxt)
            if is_loopback(urlsplit(nxt).hostname) and not is_loopback(urlsplit(url).hostname):
                raise UrlNotAllowed("a remote server may not redirect to this machine")
        except UrlNotAllowed as err:
            raise DatasetFetchError("dataset_url", f"redirect to {redact_url(nxt)} refused: {err}") from None
        url = nxt
    raise DatasetFetchError("dataset_url", f"more than {MAX_REDIRECTS} redirects")


def _declared_length(response: requests.Response) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _stream(
    response: requests.Response,
    out,
    *,
    max_bytes: int,
    deadline: _Deadline,
    on_progress: OnProgress | None,
    should_stop: ShouldStop | None,
) -> tuple[str, int]:
    """Copy the body to `out` as it arrives; returns (hex SHA-256, bytes)."""
    digest = hashlib.sha256()
    size = 0
    total = _declared_length(response) or 0
    while True:
        deadline.left()
        if should_stop is not None and should_stop():
            raise PreprocessingCancelled("downloading", size, total, unit="bytes")
        chunk = response.raw.read1(READ_BYTES, decode_content=True)
        if not chunk:
            return digest.hexdigest(), size
        size += len(chunk)
        if size > max_bytes:
            raise DatasetFetchError("dataset_url", f"the file is larger than the limit of {_mb(max_bytes)}")
        digest.update(chunk)
        out.write(chunk)
        if on_progress is not None:
            on_progress(size, total)


def download_dataset(
    url: str,
    dest_dir: Path,
    *,
    max_bytes: int = MAX_DATASET_BYTES,
    deadline_s: float = DOWNLOAD_DEADLINE_S,
    clock: Callable[[], float] = time.monotonic,
    on_progress: OnProgress | None = None,
    should_stop: ShouldStop | None = None,
) -> FetchedDataset:
    """Download `url` into `dest_dir`; `on_progress(bytes, declared bytes or 0)` as it arrives."""
    try:
        check_url(url)
    except UrlNotAllowed as err:
        raise DatasetFetchError("dataset_url", str(err)) from None
    deadline = _Deadline(deadline_s, clock)
    dest_dir = Path(dest_dir)
    target = dest_dir / _file_name(url)
    tmp = dest_dir / f".{target.name}.{uuid.uuid4().hex[:8]}.part"
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        with requests.Session() as session, _open(url, session, deadline) as response:
            declared = _declared_length(response)
            if declared is not None and declared > max_bytes:
                raise DatasetFetchError(
                    "dataset_url",
                    f"the server declares {_mb(declared)}, more than the limit of {_mb(max_bytes)}",
                )
            require_free_space(dest_dir, declared or 0, "the dataset download")
            with open(tmp, "wb") as out:
                sha, size = _stream(
                    response,
                    out,
                    max_bytes=max_bytes,
                    deadline=deadline,
                    on_progress=on_progress,
                    should_stop=should_stop,
                )
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, target)
    except DiskSpaceError as err:
        raise DatasetFetchError("dataset_url", str(err)) from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
        raise DatasetFetchError(
            "dataset_url", f"download failed: {type(err).__name__}: {scrub(str(err), url)}"
        ) from None
    except OSError as err:
        raise DatasetFetchError("dataset_url", f"cannot write the download: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return FetchedDataset(target, sha, size, redact_url(url))
