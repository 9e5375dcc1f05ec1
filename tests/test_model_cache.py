"""Base model resolution against a real HTTP stand-in for the Hugging Face Hub on 127.0.0.1.

The stand-in implements the part of the Hub API huggingface_hub 2.4 uses here: `model_info`
(`GET /api/models/{id}[/revision/{rev}]`) and file resolution (`HEAD`/`GET /{id}/resolve/{rev}/{file}`
with `X-Repo-Commit`, `ETag`, `Content-Length` and, for LFS files, `X-Linked-Etag`/`X-Linked-Size`).
It never advertises Xet, so downloads use plain HTTP. Every request is recorded, which is how the
tests prove what was (not) fetched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest

import lora_worker
from lora_worker.runtime.model import resolve as model_cache
from lora_worker.runtime.model.resolve import (
    GB,
    GpuMemoryError,
    ModelResolutionError,
    check_gpu_memory,
    estimate_gpu_memory_gib,
    find_prequantized,
    prequantized_dir,
    resolve_base_model,
    save_prequantized,
)
from lora_worker.tools.tiny_model import build_tiny_model

MODEL = "test-org/tiny-llama"
SHA = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth")
# Served by the stand-in but outside the allow-list (or inside the ignore-list): must never be requested.
NEVER_FETCHED = ("original/consolidated.00.pth", "pytorch_model.bin", "README.md")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    sha: str
    gated: bool = False
    accepted_tokens: tuple[str, ...] = ()


class FakeHub:
    """A threaded HTTP server answering like huggingface.co for the repos it holds."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, decoded path)
        # filename -> hook(handler, body) that writes the GET body itself (to slow down or stall it)
        self.body_hooks: dict[str, Callable[[BaseHTTPRequestHandler, bytes], None]] = {}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, files: dict[str, bytes], *, sha: str = SHA, **kw: object) -> FakeRepo:
        self.repos[repo_id] = FakeRepo(files=files, sha=sha, **kw)  # type: ignore[arg-type]
        return self.repos[repo_id]

    def file_requests(self, method: str | None = None) -> list[str]:
        """Filenames requested through /resolve/ (optionally only for one HTTP method)."""
        out = []
        with self._lock:
            for m, path in self.requests:
                found = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", path)
                if found and (method is None or m == method):
                    out.append(found[1])
        return out

    def gets(self, filename: str) -> int:
        return self.file_requests("GET").count(filename)

    # -- request handling ------------------------------------------------------------------------

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, head: bool
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        self._send(h, status, headers, body, head)

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append((h.command, path))
        if m := re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?$", path):
            return self._model_info(h, m[1], m[2], head)
        if m := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
            return self._resolve(h, m[1], m[2], m[3], head)
        return self._error(h, 404, "EntryNotFound", "no such route", head)

    def _model_info(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str | None, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        if rev not in (None, "main", repo.sha):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
        siblings = []
        for name, data in sorted(repo.files.items()):
            entry: dict[str, object] = {"rfilename": name, "size": len(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "pointerSize": 134,
                }
            siblings.append(entry)
        info = {"id": repo_id, "sha": repo.sha, "private": False, "gated": "manual" if repo.gated else False}
        info["siblings"] = siblings
        self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)

    def _resolve(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, filename: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        if repo.gated:
            auth = h.headers.get("Authorization")
            if auth is None or auth.removeprefix("Bearer ") not in repo.accepted_tokens:
                status = 401 if auth is None else 403
                msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                return self._error(h, status, "GatedRepo", msg, head)
        if rev not in ("main", repo.sha):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
        data = repo.files.get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", f"{filename} does not exist", head)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',  # git blob id stand-in
        }
        if filename.endswith(LFS_SUFFIXES):  # LFS files: the Hub reports the LFS object's sha256 and size
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        hook = None if head else self.body_hooks.get(filename)
        if hook is None:
            return self._send(h, 200, headers, data, head)
        h.send_response(200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        with contextlib.suppress(OSError):  # the client may be gone (killed worker)
            hook(h, data)


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_files(tiny_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tiny_dir.iterdir()) if p.is_file()}


@pytest.fixture
def hub(tiny_files: dict[str, bytes]) -> Iterator[FakeHub]:
    server = FakeHub()
    extra = {
        "original/consolidated.00.pth": b"P" * 4096,  # Meta's original checkpoint: ignored
        "pytorch_model.bin": b"B" * 4096,  # pickled weights: ignored
        "README.md": b"# tiny\n",  # not on the allow-list
    }
    server.add(MODEL, {**tiny_files, **extra})
    yield server
    server.close()


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    v = tmp_path / "volume"
    v.mkdir()
    return v


def resolve(hub: FakeHub, volume: Path, model: str = MODEL, **kw: object) -> model_cache.ResolvedModel:
    kw.setdefault("hf_token", None)
    kw.setdefault("min_free_bytes_margin", 0)  # tests must not depend on the free space of the CI disk
    return resolve_base_model(model, volume_dir=volume, hf_endpoint=hub.url, **kw)  # type: ignore[arg-type]


def wanted(files: dict[str, bytes]) -> dict[str, bytes]:
    return {n: b for n, b in files.items() if n not in NEVER_FETCHED}


# --------------------------------------------------------------------------------------------------
# Download, reuse and the other sources


def test_first_download_fills_volume_cache_then_reuses_it_without_requests(
    hub: FakeHub, volume: Path, tiny_files: dict[str, bytes]
) -> None:
    first = resolve(hub, volume)

    expected = wanted(hub.repos[MODEL].files)
    assert first.source == "downloaded"
    assert first.revision == SHA
    assert first.path == volume / "models" / "test-org--tiny-llama" / SHA
    for name, data in expected.items():
        assert (first.path / name).read_bytes() == data, name
    marker = json.loads((first.path / ".complete").read_text())
    assert marker["files"] == {n: len(b) for n, b in expected.items()}
    assert marker["revision"] == SHA
    assert first.downloaded_bytes == sum(len(b) for b in expected.values())
    assert set(first.timings) >= {"resolve", "download"} and first.timings["download"] > 0
    # Only the allow-listed files were requested, each fetched once; the rest never touched.
    for name in NEVER_FETCHED:
        assert name not in hub.file_requests(), name
    assert sorted(hub.file_requests("GET")) == sorted(expected)
    # Nothing temporary left behind; the revision name points at the commit.
    model_dir = first.path.parent
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([SHA, "refs"])
    assert not (first.path / ".cache").exists()
    assert (model_dir / "refs" / "main").read_text() == SHA

    before = len(hub.requests)
    second = resolve(hub, volume)
    assert second.source == "volume_cache"
    assert second.path == first.path and second.revision == SHA
    assert second.downloaded_bytes == 0
    assert len(hub.requests) == before  # not even an API call: refs/main names the complete snapshot


def test_download_reports_increasing_progress(
    hub: FakeHub, volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_cache, "PROGRESS_POLL_S", 0.05)

    def slow_body(h: BaseHTTPRequestHandler, data: bytes) -> None:
        for i in range(0, len(data), 32 * 1024):  # ~0.3 s for the weights: the poller reports meanwhile
            h.wfile.write(data[i : i + 32 * 1024])
            h.wfile.flush()
            time.sleep(0.03)

    hub.body_hooks["model.safetensors"] = slow_body
    events: list[dict] = []
    result = resolve(hub, volume, on_progress=events.append)

    expected = wanted(hub.repos[MODEL].files)
    total = sum(len(b) for b in expected.values())
    assert result.source == "downloaded"
    assert events and all(e["stage"] == "model_download" for e in events)
    assert all(e["bytes_total"] == total and e["files_total"] == len(expected) for e in events)
    done = [e["bytes_done"] for e in events]
    assert done == sorted(done)  # never goes backwards
    assert len(set(done)) >= len(expected)  # at least one step per file
    assert events[-1]["bytes_done"] == total and events[-1]["files_done"] == len(expected)
    assert [e["files_done"] for e in events] == sorted(e["files_done"] for e in events)
    assert all(isinstance(e["rate_mb_s"], float) and e["rate_mb_s"] >= 0 for e in events)


def test_runpod_cache_snapshot_named_by_refs_main_is_used(hub: FakeHub, volume: Path, tiny_dir: Path) -> None:
    # RunPod's model cache uses the Hugging Face hub cache layout: blobs + snapshot symlinks + refs.
    repo = volume / "huggingface-cache" / "hub" / "models--test-org--tiny-llama"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    current, older = "a" * 40, "b" * 40
    for sha in (current, older):
        snap = repo / "snapshots" / sha
        snap.mkdir(parents=True)
        for f in tiny_dir.iterdir():
            blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
            if not blob.exists():
                shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(current)
    os.utime(repo / "snapshots" / older)  # newer mtime: refs/main must win over "latest"

    result = resolve(hub, volume)

    assert result.source == "runpod_cache"
    assert result.path == repo / "snapshots" / current
    assert result.revision == current
    assert hub.requests == []

    # A snapshot RunPod has not finished (no weights yet) is not used: the worker downloads instead.
    for link in (repo / "snapshots" / current).glob("*.safetensors"):
        link.unlink()
    assert resolve(hub, volume).source == "downloaded"


def test_local_directory_is_used_as_is(hub: FakeHub, volume: Path, tiny_dir: Path, tmp_path: Path) -> None:
    result = resolve(hub, volume, model=str(tiny_dir))
    assert result.source == "local_dir"
    assert result.path == tiny_dir.resolve()
    assert result.model_id == str(tiny_dir.resolve()) and result.revision is None
    assert hub.requests == []

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelResolutionError, match=r"no \*\.safetensors"):
        resolve(hub, volume, model=str(no_weights))
    with pytest.raises(ModelResolutionError, match="neither an existing directory"):
        resolve(hub, volume, model=str(tmp_path / "missing" / "dir"))


def test_cache_dir_without_marker_is_never_used(hub: FakeHub, volume: Path) -> None:
    model_dir = volume / "models" / "test-org--tiny-llama"
    (model_dir / SHA).mkdir(parents=True)
    (model_dir / SHA / "config.json").write_text('{"truncated": ')  # what a crash mid-copy leaves
    (model_dir / "refs").mkdir()
    (model_dir / "refs" / "main").write_text(SHA)

    result = resolve(hub, volume)

    assert result.source == "downloaded"
    assert (result.path / "config.json").read_bytes() == hub.repos[MODEL].files["config.json"]
    assert (result.path / ".complete").is_file()


# --------------------------------------------------------------------------------------------------
# Concurrency and crash recovery


def test_two_concurrent_starts_download_each_file_once(
    hub: FakeHub, volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_cache, "PROGRESS_POLL_S", 0.05)

    def delayed_body(h: BaseHTTPRequestHandler, data: bytes) -> None:
        time.sleep(1.5)  # longer than stale_lock_s below: only the holder's heartbeat keeps its lock
        h.wfile.write(data)

    hub.body_hooks["model.safetensors"] = delayed_body
    barrier = threading.Barrier(2)
    results: list[model_cache.ResolvedModel] = []
    errors: list[BaseException] = []
    events: list[dict] = []

    def start_worker() -> None:
        barrier.wait()
        try:
            results.append(resolve(hub, volume, stale_lock_s=1.0, on_progress=events.append))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=start_worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert not errors, errors
    assert sorted(r.source for r in results) == ["downloaded", "volume_cache"]
    assert results[0].path == results[1].path
    for name in wanted(hub.repos[MODEL].files):
        assert hub.gets(name) == 1, name
    waiter = next(r for r in results if r.source == "volume_cache")
    assert waiter.timings["lock_wait"] > 0.5
    assert any(e.get("waiting_for_lock") for e in events)  # the waiter reported the other worker's progress


def test_killed_worker_leaves_partial_download_and_lock_that_are_recovered(
    hub: FakeHub, volume: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stall = threading.Event()

    def stall_half_way(h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.wfile.write(data[: len(data) // 2])
        h.wfile.flush()
        stall.wait(30)

    hub.body_hooks["model.safetensors"] = stall_half_way
    src = str(Path(lora_worker.__file__).resolve().parents[1])
    code = (
        "from pathlib import Path\n"
        "from lora_worker.runtime.model.resolve import resolve_base_model\n"
        f"resolve_base_model({MODEL!r}, volume_dir=Path({str(volume)!r}), hf_token=None,"
        f" hf_endpoint={hub.url!r}, min_free_bytes_margin=0)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": src})
    model_dir = volume / "models" / "test-org--tiny-llama"
    partial = model_dir / f".{SHA}.partial"
    try:
        deadline = time.monotonic() + 30
        while not (hub.gets("model.safetensors") and list(partial.rglob("*.incomplete"))):
            assert worker.poll() is None, "worker exited early"
            assert time.monotonic() < deadline, "worker never reached the weights"
            time.sleep(0.05)
        time.sleep(0.2)  # let the first half land in the .incomplete file
    finally:
        worker.kill()  # SIGKILL: no cleanup of any kind runs
        worker.wait()
    hub.body_hooks.clear()
    stall.set()

    owner = json.loads((model_dir / ".download.lock.owner.json").read_text())
    assert owner["pid"] == worker.pid
    assert (model_dir / ".download.lock").exists()
    assert (partial / "config.json").is_file() and not (model_dir / SHA).exists()

    with caplog.at_level(logging.WARNING, logger="lora_worker.runtime.model.resolve"):
        result = resolve(hub, volume, stale_lock_s=3600)  # broken for the dead pid, not for age

    assert f"breaking stale lock {model_dir / '.download.lock'}: held by pid {worker.pid}" in caplog.text
    assert "resuming the partial download" in caplog.text
    assert result.source == "downloaded" and result.path == model_dir / SHA
    for name, data in wanted(hub.repos[MODEL].files).items():
        assert (result.path / name).read_bytes() == data, name
    # Resumed, not restarted: files the killed worker finished were not fetched again.
    assert hub.gets("config.json") == 1 and hub.gets("tokenizer.json") == 1
    assert hub.gets("model.safetensors") == 2
    assert result.downloaded_bytes == len(hub.repos[MODEL].files["model.safetensors"])
    assert not partial.exists() and not list(model_dir.rglob("*.incomplete"))
    assert not (model_dir / ".download.lock").exists()
    assert not (model_dir / ".download.lock.owner.json").exists()


def test_lock_whose_heartbeat_stopped_is_broken(
    hub: FakeHub, volume: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from filelock import SoftFileLock

    # A worker on another machine took the lock an hour ago and stopped refreshing it (host lost).
    model_dir = volume / "models" / "test-org--tiny-llama"
    model_dir.mkdir(parents=True)
    lock_path = model_dir / ".download.lock"
    abandoned = SoftFileLock(str(lock_path))
    abandoned.acquire()
    now = time.time()
    owner = {
        "host": "other-host",
        "pid": 4242,
        "acquired_at": now - 7200,
        "heartbeat_at": now - 3600,
        "lock_ino": lock_path.stat().st_ino,
    }
    (model_dir / ".download.lock.owner.json").write_text(json.dumps(owner))
    try:
        with caplog.at_level(logging.WARNING, logger="lora_worker.runtime.model.resolve"):
            result = resolve(hub, volume, stale_lock_s=60, lock_timeout_s=20)
    finally:
        with contextlib.suppress(OSError):
            abandoned.release()
    assert result.source == "downloaded"
    assert "breaking stale lock" in caplog.text and "other-host" in caplog.text and "heartbeat" in caplog.text


def test_stale_reason_rules() -> None:
    stale = model_cache._stale_reason
    now = 1_000_000.0
    live_here = {"host": "me", "pid": os.getpid(), "heartbeat_at": now - 1}
    assert stale(live_here, lock_mtime=now, now=now, stale_lock_s=60, hostname="me") is None
    assert stale(
        {**live_here, "heartbeat_at": now - 61}, lock_mtime=now, now=now, stale_lock_s=60, hostname="me"
    )
    # Another host: its pid cannot be checked here, only the heartbeat's age.
    remote = {"host": "elsewhere", "pid": 999_999_999, "heartbeat_at": now - 30}
    assert stale(remote, lock_mtime=now, now=now, stale_lock_s=60, hostname="me") is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    reason = stale(
        {"host": "me", "pid": dead.pid, "heartbeat_at": now},
        lock_mtime=now,
        now=now,
        stale_lock_s=60,
        hostname="me",
    )
    assert reason and "no longer running" in reason
    # No owner record: a fresh marker is a holder about to write one; an old one is abandoned.
    assert stale(None, lock_mtime=now - 5, now=now, stale_lock_s=60, hostname="me") is None
    assert stale(None, lock_mtime=now - 120, now=now, stale_lock_s=60, hostname="me")


# --------------------------------------------------------------------------------------------------
# Pre-flight errors


def test_unknown_model_says_not_found(hub: FakeHub, volume: Path) -> None:
    with pytest.raises(
        ModelResolutionError, match=r"'test-org/no-such-model' was not found on the Hugging Face Hub"
    ):
        resolve(hub, volume, model="test-org/no-such-model")
    assert hub.file_requests() == []


def test_gated_model_needs_a_token_that_accepted_the_licence(
    hub: FakeHub, volume: Path, tiny_files: dict[str, bytes]
) -> None:
    hub.add("test-org/gated-llama", dict(tiny_files), gated=True, accepted_tokens=("hf_accepted",))

    with pytest.raises(ModelResolutionError) as no_token:
        resolve(hub, volume, model="test-org/gated-llama")
    msg = str(no_token.value)
    assert "set the HF_TOKEN env var on the endpoint" in msg
    assert "https://huggingface.co/test-org/gated-llama" in msg
    assert hub.file_requests() == []  # refused from model_info alone, before any download

    # A token whose account never accepted the licence: the Hub answers 403 GatedRepo on the first file.
    with pytest.raises(ModelResolutionError) as not_accepted:
        resolve(hub, volume, model="test-org/gated-llama", hf_token="hf_not_accepted")
    assert "HF_TOKEN" in str(not_accepted.value) and "has not been granted access" in str(not_accepted.value)
    assert hub.gets("model.safetensors") == 0
    assert not list((volume / "models" / "test-org--gated-llama").glob(".*.partial"))

    ok = resolve(hub, volume, model="test-org/gated-llama", hf_token="hf_accepted")
    assert ok.source == "downloaded" and (ok.path / "model.safetensors").is_file()


def test_model_that_is_not_a_causal_lm_is_refused_before_the_weights(hub: FakeHub, volume: Path) -> None:
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64}
    hub.add(
        "test-org/bert-ish",
        {
            "config.json": json.dumps(config).encode(),
            "model.safetensors": b"W" * 2048,
            "tokenizer.json": b"{}",
        },
    )
    with pytest.raises(ModelResolutionError, match=r"not a causal language model.*BertModel"):
        resolve(hub, volume, model="test-org/bert-ish")
    assert hub.gets("model.safetensors") == 0
    model_dir = volume / "models" / "test-org--bert-ish"
    assert not (model_dir / SHA).exists() and not (model_dir / f".{SHA}.partial").exists()


def test_too_little_free_space_is_refused_with_both_numbers(
    hub: FakeHub, volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        model_cache.shutil,
        "disk_usage",
        lambda path: SimpleNamespace(total=100 * GB, used=98 * GB, free=2 * GB),
    )
    with pytest.raises(ModelResolutionError) as err:
        resolve(hub, volume, min_free_bytes_margin=5 * GB)
    msg = str(err.value)
    assert "not enough free space" in msg
    assert "5.00 GB" in msg and "2.00 GB is free" in msg  # needed (files + margin) and available
    assert hub.file_requests() == []


# --------------------------------------------------------------------------------------------------
# GPU memory


LLAMA3_70B = {
    "num_hidden_layers": 80,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "vocab_size": 128256,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}


def test_gpu_estimate_matches_measured_llama3_70b_peaks() -> None:
    def est(tokens: int, r: int = 16) -> float:
        return estimate_gpu_memory_gib(LLAMA3_70B, lora_r=r, micro_batch_tokens=tokens)

    assert 41.0 <= est(2048) <= 42.0
    assert 50.0 <= est(8192) <= 52.0
    assert 64.0 <= est(16384) <= 66.0
    assert est(2048, r=64) > est(2048, r=16)
    assert estimate_gpu_memory_gib(LLAMA3_70B, lora_r=16, micro_batch_tokens=2048, bits=16) > 2 * est(2048)

    check_gpu_memory(est(8192), 79.2)  # fits an H100
    with pytest.raises(GpuMemoryError) as err:
        check_gpu_memory(est(16384), 44.5)
    msg = str(err.value)
    assert isinstance(err.value, ModelResolutionError)
    assert f"{est(16384):.1f} GiB" in msg and "44.5 GiB" in msg
    assert "micro_batch_tokens" in msg and "max_seq_length" in msg


# --------------------------------------------------------------------------------------------------
# Pre-quantized NF4 copy


def test_prequantized_copy_round_trips_bit_identically(tiny_dir: Path, volume: Path) -> None:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    target = prequantized_dir(volume, MODEL, SHA, quant)
    assert target != prequantized_dir(volume, MODEL, SHA, {**quant, "bnb_4bit_quant_type": "fp4"})
    assert target != prequantized_dir(volume, MODEL, "f" * 40, quant)
    assert find_prequantized(volume, MODEL, SHA, quant) is None
    target.mkdir(parents=True)  # a dir left without its marker does not count
    assert find_prequantized(volume, MODEL, SHA, quant) is None

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=bnb_config, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert save_prequantized(model, tokenizer, target) == target
    assert find_prequantized(volume, MODEL, SHA, quant) == target

    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16, device_map={"": "cpu"})
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    ids = tokenizer("How much should I save each month?", return_tensors="pt").input_ids
    with torch.no_grad():
        original_logits = model(ids).logits
        reloaded_logits = reloaded(ids).logits
    assert torch.equal(original_logits, reloaded_logits)
    assert (
        AutoTokenizer.from_pretrained(target)("How much")["input_ids"] == tokenizer("How much")["input_ids"]
    )

    def weights_bytes(d: Path) -> int:
        return sum(p.stat().st_size for p in d.glob("*.safetensors"))

    assert weights_bytes(target) < weights_bytes(tiny_dir)
    assert not list(target.parent.glob(f".{target.name}.partial-*"))


@pytest.mark.e2e
def test_job_downloads_once_then_starts_from_the_saved_nf4_copy(hub: FakeHub, volume: Path) -> None:
    """A first job quantizes on load and saves the NF4 copy; the next job loads that copy instead,
    with the same base model (same held-out loss before training)."""
    from lora_worker.runtime.job import run_job
    from lora_worker.runtime.settings import Settings

    settings = Settings.from_env({"VOLUME_DIR": str(volume), "HF_ENDPOINT": hub.url})
    job = {
        "dataset_path": str(Path(__file__).resolve().parents[1] / "examples" / "brightrun-sample-24.json"),
        "base_model": MODEL,
        "hyperparameters": {"num_epochs": 1, "max_seq_length": 1024, "gradient_accumulation_steps": 4},
        "evaluation": {"num_samples": 0},
    }
    first = run_job({**job, "job_id": "first", "dry_run": False}, settings=settings)
    assert first["status"] == "completed", first
    assert "model_load_quantize" in first["timings_s"] and "model_save_prequantized" in first["timings_s"]
    fetched = len(hub.requests)
    second = run_job({**job, "job_id": "second"}, settings=settings)
    assert second["status"] == "completed", second
    assert (
        "model_load_prequantized" in second["timings_s"] and "model_load_quantize" not in second["timings_s"]
    )
    assert len(hub.requests) == fetched  # nothing downloaded again
    assert second["metrics"]["eval_loss_before"] == first["metrics"]["eval_loss_before"]
