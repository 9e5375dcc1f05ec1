from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "brightrun-sample-24.json"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny offline Llama-architecture model, built once per test session."""
    from lora_worker.tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """The sample's first 6 conversations: a job that trains, holds one out and samples, in seconds."""
    doc = json.loads(SAMPLE.read_text(encoding="utf-8"))
    doc["conversations"] = doc["conversations"][:6]
    path = tmp_path_factory.mktemp("data") / "brightrun-small-6.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def tiny_job(tiny_model: Path, **over) -> dict:
    """A small job on the tiny model and the shipped sample; keyword groups merge into the defaults."""
    job = {
        "dataset_path": str(SAMPLE),
        "base_model": str(tiny_model),
        "hyperparameters": {
            "num_epochs": 2,
            "learning_rate": 0.002,
            "lora_dropout": 0.0,
            "max_seq_length": 1024,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
        },
        "training": {"checkpoint_steps": 5},
        "evaluation": {"num_samples": 2, "max_new_tokens": 8},
    }
    return merge_groups(job, **over)


def small_job(tiny_model: Path, small_dataset: Path, **over) -> dict:
    """One epoch on 6 conversations, one optimizer step per micro-batch: the cheapest real job."""
    job = tiny_job(
        tiny_model,
        dataset_path=str(small_dataset),
        hyperparameters={"num_epochs": 1, "gradient_accumulation_steps": 1},
        evaluation={"num_samples": 1, "max_new_tokens": 4, "num_scenarios": 0},
    )
    return merge_groups(job, **over)


def merge_groups(job: dict, **over) -> dict:
    """`job` with each keyword applied: a dict merges into that group, anything else replaces it."""
    for k, v in over.items():
        job[k] = {**job.get(k, {}), **v} if isinstance(v, dict) else v
    return job


class Recorder:
    """An event channel that keeps every event the job sends, in order, with its kind
    ("progress", "stage" or "final") in `kinds` (for tests)."""

    def __init__(self, on_event=None):
        self.events: list[dict] = []
        self.kinds: list[str] = []
        self.on_event = on_event

    def send(self, event, *, kind):
        self.events.append(dict(event))
        self.kinds.append(kind)
        if self.on_event:
            self.on_event(event)

    def close(self, timeout_s):
        return True


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 that records every request and answers with `respond`.

    `respond(method, path, headers, body)` gives the status code, or (status, response body);
    requests are kept as (method, path, lower-cased headers, body, arrival unix time).
    """

    def __init__(self, respond=lambda method, path, headers, body: 200):
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, dict, bytes, float]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                arrived = time.time()
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer = respond(self.command, self.path, headers, body)
                code, payload = answer if isinstance(answer, tuple) else (answer, b"")
                outer.requests.append((self.command, self.path, headers, body, arrived))
                self.send_response(code)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server holding the studio's dashboard tables (tests/seed_dashboard.py)."""
    import seed_dashboard

    yield from seed_dashboard.postgres_server()


@pytest.fixture
def dashboard_db(postgres):
    import seed_dashboard

    yield from seed_dashboard.fresh_database(postgres)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of `size` (e.g. "512k") mounted at `path`, for faults such as a full volume;
    the test is skipped where mounting is not permitted (it needs root and CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def two_gpus() -> None:
    """Skip unless this machine has two CUDA GPUs (NCCL puts one rank on each)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
