from __future__ import annotations

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


def merge_groups(job: dict, **over) -> dict:
    """`job` with each keyword applied: a dict merges into that group, anything else replaces it."""
    for k, v in over.items():
        job[k] = {**job.get(k, {}), **v} if isinstance(v, dict) else v
    return job


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 that records every request and answers with `respond`.

    `respond(method, path, headers, body)` gives the status code, or (status, response body);
    requests are kept as (method, path, lower-cased headers, body).
    """

    def __init__(self, respond=lambda method, path, headers, body: 200):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer = respond(self.command, self.path, headers, body)
                code, payload = answer if isinstance(answer, tuple) else (answer, b"")
                outer.requests.append((self.command, self.path, headers, body))
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
