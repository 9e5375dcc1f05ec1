"""Where the base model comes from: config and tokenizer first, weights later, against a real HTTP
stand-in for the Hugging Face Hub on 127.0.0.1 (tests/fake_hub.py) and real processes and files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from conftest import tmpfs
from fake_hub import MODEL, NEVER_FETCHED, SHA, FakeHub

import lora_worker
from lora_worker.runtime.files import DiskSpaceError
from lora_worker.runtime.model import download_progress
from lora_worker.runtime.model.layout import ModelResolutionError
from lora_worker.runtime.model.resolve import (
    ModelMeta,
    ResolvedModel,
    resolve_base_model,
    resolve_model_meta,
    resolve_model_weights,
)
from lora_worker.tools import fetch_model

MODEL_DIR = Path("models") / "test-org--tiny-llama"


@pytest.fixture(scope="session")
def tiny_files(tiny_model: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tiny_model.iterdir()) if p.is_file()}


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


def resolve(hub: FakeHub, volume: Path, model: str = MODEL, **kw: object) -> ResolvedModel:
    kw.setdefault("hf_token", None)
    kw.setdefault("min_free_bytes_margin", 0)  # tests must not depend on the free space of the CI disk
    return resolve_base_model(model, volume_dir=volume, hf_endpoint=hub.url, **kw)  # type: ignore[arg-type]


def meta_of(hub: FakeHub, volume: Path, model: str = MODEL, **kw: object) -> ModelMeta:
    kw.setdefault("hf_token", None)
    return resolve_model_meta(model, volume_dir=volume, hf_endpoint=hub.url, **kw)  # type: ignore[arg-type]


def wanted(files: dict[str, bytes]) -> dict[str, bytes]:
    return {n: b for n, b in files.items() if n not in NEVER_FETCHED}


def is_meta(name: str) -> bool:
    return not name.endswith((".safetensors", ".index.json"))


# --------------------------------------------------------------------------------------------------
# Config first, weights later


def test_meta_fetches_config_and_tokenizer_without_touching_a_weight_file(hub: FakeHub, volume: Path) -> None:
    for name in hub.repos[MODEL].files:
        if name.endswith(".safetensors"):
            hub.fail[name] = 500  # any weight request would fail the call

    meta = meta_of(hub, volume)

    assert hub.weight_requests() == []
    assert meta.source == "hub" and not meta.weights_present
    assert meta.model_id == MODEL and meta.revision == SHA
    assert meta.path == volume / MODEL_DIR / "meta" / SHA
    assert meta.config["architectures"] == ["LlamaForCausalLM"]
    assert meta.config == json.loads(hub.repos[MODEL].files["config.json"])
    fetched = sorted(hub.file_requests("GET"))
    assert fetched == sorted(n for n in wanted(hub.repos[MODEL].files) if is_meta(n))
    assert meta.download_bytes == sum(len(b) for b in wanted(hub.repos[MODEL].files).values())
    assert (volume / MODEL_DIR / "refs" / "main").read_text() == SHA


def test_weights_reuse_the_config_and_tokenizer_the_meta_call_fetched(hub: FakeHub, volume: Path) -> None:
    meta = meta_of(hub, volume)
    before = len(hub.requests)
    again = meta_of(hub, volume)
    assert again.path == meta.path and again.revision == SHA
    assert len(hub.requests) == before  # refs/main and the verified meta folder: no request at all

    resolved = resolve_model_weights(
        meta, volume_dir=volume, hf_token=None, hf_endpoint=hub.url, min_free_bytes_margin=0
    )

    assert resolved.source == "downloaded" and resolved.path == volume / MODEL_DIR / SHA
    for name, data in wanted(hub.repos[MODEL].files).items():
        assert (resolved.path / name).read_bytes() == data, name
        assert hub.gets(name) == 1, name  # the small files were fetched once, by the meta call
    after = meta_of(hub, volume)
    assert after.source == "volume_cache" and after.path == resolved.path and after.weights_present


def test_first_download_fills_volume_cache_then_reuses_it_without_requests(
    hub: FakeHub, volume: Path
) -> None:
    first = resolve(hub, volume)

    expected = wanted(hub.repos[MODEL].files)
    assert first.source == "downloaded"
    assert first.revision == SHA
    assert first.path == volume / MODEL_DIR / SHA
    for name, data in expected.items():
        assert (first.path / name).read_bytes() == data, name
    marker = json.loads((first.path / ".complete").read_text())
    assert marker["files"] == {n: len(b) for n, b in expected.items()}
    assert marker["revision"] == SHA
    # The weights came over in the weights step; the small files with the config step before it.
    assert first.downloaded_bytes == len(expected["model.safetensors"])
    assert set(first.timings) >= {"resolve", "download", "lock_wait"} and first.timings["download"] > 0
    for name in NEVER_FETCHED:
        assert name not in hub.file_requests(), name
    assert sorted(hub.file_requests("GET")) == sorted(expected)
    # Nothing temporary left behind; the revision name points at the commit.
    model_dir = first.path.parent
    assert sorted(p.name for p in model_dir.iterdir()) == sorted([SHA, "meta", "refs"])
    assert sorted(p.name for p in (model_dir / "meta").iterdir()) == [SHA]
    assert not (first.path / ".cache").exists()
    assert (model_dir / "refs" / "main").read_text() == SHA

    before = len(hub.requests)
    second = resolve(hub, volume)
    assert second.source == "volume_cache"
    assert second.path == first.path and second.revision == SHA
    assert second.downloaded_bytes == 0
    assert len(hub.requests) == before  # not even an API call: refs/main names the complete snapshot


def test_download_reports_increasing_progress(
    hub: FakeHub, volume: Path, tiny_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download_progress, "PROGRESS_POLL_S", 0.05)
    shards = {f"model-0000{i}-of-00003.safetensors": bytes([i]) * (20_000 * i) for i in (1, 2, 3)}
    index = {"weight_map": {f"w{i}": name for i, name in enumerate(shards)}}
    small = {n: b for n, b in tiny_files.items() if not n.endswith(".safetensors")}
    hub.add(
        "test-org/sharded", {**small, **shards, "model.safetensors.index.json": json.dumps(index).encode()}
    )
    events: list[dict] = []

    result = resolve(hub, volume, model="test-org/sharded", on_progress=events.append)

    files = wanted(hub.repos["test-org/sharded"].files)
    total = sum(len(b) for b in files.values())
    assert result.source == "downloaded"
    assert events and all(e["stage"] == "model_download" for e in events)
    assert all(e["bytes_total"] == total and e["files_total"] == len(files) for e in events)
    done = [e["bytes_done"] for e in events]
    assert done == sorted(done)  # never goes backwards
    assert len(set(done)) >= 5  # the config step's files, then one step per weight file
    assert done[0] == sum(len(b) for n, b in files.items() if is_meta(n))
    assert events[-1]["bytes_done"] == total and events[-1]["files_done"] == len(files)
    assert [e["files_done"] for e in events] == sorted(e["files_done"] for e in events)
    assert all(isinstance(e["rate_mb_s"], float) and e["rate_mb_s"] >= 0 for e in events)


def test_runpod_cache_snapshot_named_by_refs_main_is_used(
    hub: FakeHub, volume: Path, tiny_model: Path
) -> None:
    # RunPod's model cache uses the Hugging Face hub cache layout: blobs + snapshot symlinks + refs.
    repo = volume / "huggingface-cache" / "hub" / "models--test-org--tiny-llama"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    current, older = "a" * 40, "b" * 40
    for sha in (current, older):
        snap = repo / "snapshots" / sha
        snap.mkdir(parents=True)
        for f in tiny_model.iterdir():
            blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
            if not blob.exists():
                shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(current)
    os.utime(repo / "snapshots" / older)  # newer mtime: refs/main must win over "latest"

    meta = meta_of(hub, volume)
    assert meta.source == "runpod_cache" and meta.path == repo / "snapshots" / current
    result = resolve(hub, volume)
    assert result.source == "runpod_cache"
    assert result.path == repo / "snapshots" / current
    assert result.revision == current
    assert hub.requests == []

    # A snapshot RunPod has not finished (no weights yet) is not used: the worker downloads instead.
    for link in (repo / "snapshots" / current).glob("*.safetensors"):
        link.unlink()
    assert resolve(hub, volume).source == "downloaded"


def test_local_directory_is_used_as_is(hub: FakeHub, volume: Path, tiny_model: Path, tmp_path: Path) -> None:
    meta = meta_of(hub, volume, model=str(tiny_model))
    assert meta.source == "local_dir" and meta.path == tiny_model.resolve() and meta.weights_present
    assert meta.config["model_type"] == "llama"
    result = resolve(hub, volume, model=str(tiny_model))
    assert result.source == "local_dir"
    assert result.path == tiny_model.resolve()
    assert result.model_id == str(tiny_model.resolve()) and result.revision is None
    assert hub.requests == []

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelResolutionError, match=r"no \*\.safetensors"):
        meta_of(hub, volume, model=str(no_weights))  # refused at the config step already
    with pytest.raises(ModelResolutionError, match="neither an existing directory"):
        meta_of(hub, volume, model=str(tmp_path / "missing" / "dir"))


def test_cache_dir_without_marker_is_never_used(hub: FakeHub, volume: Path) -> None:
    model_dir = volume / MODEL_DIR
    (model_dir / SHA).mkdir(parents=True)
    (model_dir / SHA / "config.json").write_text('{"truncated": ')  # what a crash mid-copy leaves
    (model_dir / "refs").mkdir()
    (model_dir / "refs" / "main").write_text(SHA)

    result = resolve(hub, volume)

    assert result.source == "downloaded"
    assert (result.path / "config.json").read_bytes() == hub.repos[MODEL].files["config.json"]
    assert (result.path / ".complete").is_file()


def test_a_corrupt_config_folder_is_fetched_again(hub: FakeHub, volume: Path) -> None:
    meta = meta_of(hub, volume)
    tok = meta.path / "tokenizer.json"
    tok.write_bytes(bytes(b ^ 0xFF for b in tok.read_bytes()))  # same size, other bytes

    again = meta_of(hub, volume)

    assert again.path == meta.path
    assert (again.path / "tokenizer.json").read_bytes() == hub.repos[MODEL].files["tokenizer.json"]
    assert hub.gets("tokenizer.json") == 2


# --------------------------------------------------------------------------------------------------
# Concurrency and crash recovery


def test_two_concurrent_starts_download_the_weights_once(
    hub: FakeHub, volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download_progress, "PROGRESS_POLL_S", 0.05)
    waiting = threading.Event()

    def held_until_the_other_waits(h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.wfile.write(data[:1024])
        h.wfile.flush()
        waiting.wait(60)  # the holder finishes only once the other worker reported waiting on the lock
        h.wfile.write(data[1024:])

    def on_progress(event: dict) -> None:
        events.append(event)
        if event.get("waiting_for_lock"):
            waiting.set()

    hub.body_hooks["model.safetensors"] = held_until_the_other_waits
    barrier = threading.Barrier(2)
    results: list[ResolvedModel] = []
    errors: list[BaseException] = []
    events: list[dict] = []

    def start_worker() -> None:
        barrier.wait()
        try:
            results.append(resolve(hub, volume, on_progress=on_progress))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=start_worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    assert not errors, errors
    assert waiting.is_set()
    assert sorted(r.source for r in results) == ["downloaded", "volume_cache"]
    assert results[0].path == results[1].path
    assert hub.gets("model.safetensors") == 1
    for name in wanted(hub.repos[MODEL].files):  # small files: at most once per worker, before the lock
        assert 1 <= hub.gets(name) <= 2, name
    waiter = next(r for r in results if r.source == "volume_cache")
    assert waiter.timings["lock_wait"] > 0


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
    model_dir = volume / MODEL_DIR
    partial = model_dir / f".{SHA}.partial"
    try:
        deadline = time.monotonic() + 60
        while not (hub.gets("model.safetensors") and list(partial.rglob("*.incomplete"))):
            assert worker.poll() is None, "worker exited early"
            assert time.monotonic() < deadline, "worker never reached the weights"
            time.sleep(0.05)
    finally:
        worker.kill()  # SIGKILL: no cleanup of any kind runs
        worker.wait()
    hub.body_hooks.clear()
    stall.set()

    owner = json.loads((model_dir / ".download.lock.owner.json").read_text())
    assert owner["pid"] == worker.pid
    assert (model_dir / ".download.lock").exists()
    assert (partial / "config.json").is_file() and not (model_dir / SHA).exists()

    with caplog.at_level(logging.WARNING):
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
    # A worker on another machine took the lock an hour ago and stopped refreshing it (host lost).
    model_dir = volume / MODEL_DIR
    model_dir.mkdir(parents=True)
    lock_path = model_dir / ".download.lock"
    lock_path.touch()
    now = time.time()
    owner = {
        "host": "other-host",
        "pid": 4242,
        "acquired_at": now - 7200,
        "heartbeat_at": now - 3600,
        "lock_ino": lock_path.stat().st_ino,
    }
    (model_dir / ".download.lock.owner.json").write_text(json.dumps(owner))
    with caplog.at_level(logging.WARNING):
        result = resolve(hub, volume, stale_lock_s=60, lock_timeout_s=20)
    assert result.source == "downloaded"
    assert "breaking stale lock" in caplog.text and "other-host" in caplog.text and "heartbeat" in caplog.text


# --------------------------------------------------------------------------------------------------
# Pre-flight errors


def test_unknown_model_says_not_found(hub: FakeHub, volume: Path) -> None:
    with pytest.raises(
        ModelResolutionError, match=r"'test-org/no-such-model' was not found on the Hugging Face Hub"
    ):
        meta_of(hub, volume, model="test-org/no-such-model")
    assert hub.file_requests() == []


def test_gated_model_needs_a_token_that_accepted_the_licence(
    hub: FakeHub, volume: Path, tiny_files: dict[str, bytes]
) -> None:
    hub.add("test-org/gated-llama", dict(tiny_files), gated=True, accepted_tokens=("hf_accepted",))

    with pytest.raises(ModelResolutionError) as no_token:
        meta_of(hub, volume, model="test-org/gated-llama")
    msg = str(no_token.value)
    assert "set the HF_TOKEN env var on the endpoint" in msg
    assert "https://huggingface.co/test-org/gated-llama" in msg
    assert hub.file_requests() == []  # refused from model_info alone, before any download

    # A token whose account never accepted the licence: the Hub answers 403 GatedRepo on the first file.
    with pytest.raises(ModelResolutionError) as not_accepted:
        meta_of(hub, volume, model="test-org/gated-llama", hf_token="hf_not_accepted")
    assert "HF_TOKEN" in str(not_accepted.value) and "has not been granted access" in str(not_accepted.value)
    assert "hf_not_accepted" not in str(not_accepted.value)
    assert hub.gets("model.safetensors") == 0
    gated_dir = volume / "models" / "test-org--gated-llama"
    assert not [p for p in gated_dir.rglob("*") if ".partial" in p.name]

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
        meta_of(hub, volume, model="test-org/bert-ish")
    assert hub.weight_requests() == []
    model_dir = volume / "models" / "test-org--bert-ish"
    assert not (model_dir / SHA).exists() and not (model_dir / "meta" / SHA).exists()


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB filesystem (tmpfs): room for the config and tokenizer, not the weights."""
    with tmpfs(tmp_path / "small", "256k") as mnt:
        yield mnt


def test_a_full_volume_is_refused_before_the_weights_with_the_numbers(
    hub: FakeHub, small_volume: Path
) -> None:
    meta = meta_of(hub, small_volume)  # the small files fit
    assert meta.source == "hub"

    with pytest.raises(DiskSpaceError) as err:
        resolve_model_weights(
            meta, volume_dir=small_volume, hf_token=None, hf_endpoint=hub.url, min_free_bytes_margin=5 * 10**9
        )
    msg = str(err.value)
    assert "not enough free space for the download of test-org/tiny-llama" in msg
    assert "+5.0 GB kept free" in msg and "GB free on the volume" in msg
    assert hub.weight_requests() == []
    assert not (small_volume / MODEL_DIR / f".{SHA}.partial").exists()


# --------------------------------------------------------------------------------------------------
# The terminal command


def test_fetch_model_command_prints_the_result(
    hub: FakeHub, volume: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)

    assert fetch_model.main([MODEL, "--volume-dir", str(volume), "--meta-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "hub" and out["path"] == str(volume / MODEL_DIR / "meta" / SHA)
    assert hub.weight_requests() == []

    assert fetch_model.main([MODEL, "--volume-dir", str(volume)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "downloaded" and out["path"] == str(volume / MODEL_DIR / SHA)

    assert fetch_model.main(["test-org/no-such-model", "--volume-dir", str(volume)]) == 2
    assert "was not found on the Hugging Face Hub" in capsys.readouterr().err
