"""The terminal client's `chat` and `list`: their job inputs, what they print, and a real round trip
through the local endpoint and the production worker (`python handler.py`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import requests
import torch

from lora_worker.runtime.delivery.adapter import save_adapter
from lora_worker.runtime.model.load import add_lora, load_base_model, load_tokenizer
from lora_worker.tools import client as cli
from lora_worker.tools.client_tasks import ChatInputError
from lora_worker.tools.local_endpoint import LocalEndpoint

REPO = Path(__file__).resolve().parents[1]

REPLY = {"text": "Let's look at it together.", "new_tokens": 7, "seconds": 0.4, "finish_reason": "stop"}
GENERATED = {
    "job_id": "rp-1", "task": "generate", "status": "completed", "stage": "completed",
    "adapter": {"source": "job", "job_id": "trained-1", "path": "/v/jobs/trained-1/adapter", "base_model": "org/m"},
    "replies": [{"index": 0, "prompt": "I am scared", "adapted": REPLY,
                 "base": {**REPLY, "text": "ore months", "finish_reason": "length"}}],
    "warnings": [],
}  # fmt: skip
LISTED = {
    "task": "list", "status": "completed", "stage": "completed", "count": 1, "skipped": [],
    "adapters": [{"job_id": "trained-1", "trained_at": "2026-11-02T10:00:00+00:00", "base_model": "org/m",
                  "dataset": {"name": "brightrun", "version": "4.0.0"}, "verdict": "improved",
                  "metrics": {"eval_loss_before": 2.0, "eval_loss_after": 1.8}, "adapter_present": True}],
}  # fmt: skip


def chat_args(*argv: str):
    return cli._parser().parse_args(["chat", *argv])


def test_chat_flags_build_a_generate_input(tmp_path, monkeypatch):
    convs = tmp_path / "c.json"
    convs.write_text(json.dumps([[{"role": "user", "content": "from the file"}]]))
    a = chat_args(
        "--adapter", "trained-1", "--message", "hello", "--message", "and again", "--system", "be kind",
        "--messages-json", str(convs), "--max-new-tokens", "32", "--temperature", "0.7", "--compare-base",
    )  # fmt: skip
    assert cli.build_generate_input(a, local=False) == {
        "task": "generate",
        "adapter": "trained-1",
        "messages": [
            [{"role": "user", "content": "from the file"}],
            [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello"}],
            [{"role": "system", "content": "be kind"}, {"role": "user", "content": "and again"}],
        ],
        "max_new_tokens": 32,
        "temperature": 0.7,
        "compare_base": True,
    }
    folder = tmp_path / "adapter"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    local = cli.build_generate_input(chat_args("--adapter", "adapter", "--message", "hi"), local=True)
    assert local["adapter"] == str(folder)  # a local endpoint's worker gets an absolute path
    with pytest.raises(ChatInputError, match="nothing to say"):
        cli.build_generate_input(chat_args("--adapter", "x"), local=False)


@pytest.fixture
def endpoint():
    ep = LocalEndpoint(requeue_after_s=30.0, take_wait_s=0.2).start()
    yield ep
    ep.close()


def answer_next_job(ep: LocalEndpoint, result: dict) -> threading.Thread:
    """A stand-in worker speaking the SDK's protocol: takes the next job, records its input, answers."""
    seen: dict = {}

    def run() -> None:
        while True:
            took = requests.get(
                f"{ep.url}/job-take/w1", params={"gpu": "local", "job_in_progress": "0"}, timeout=10
            )
            if took.status_code == 200:
                job = took.json()
                seen.update(job["input"])
                requests.post(
                    f"{ep.url}/job-done/w1/{job['id']}?gpu=local&isStream=false", json=result, timeout=10
                )
                return

    t = threading.Thread(target=run, daemon=True)
    t.seen = seen  # type: ignore[attr-defined]
    t.start()
    return t


def test_chat_prints_each_reply_beside_the_base_models(endpoint, capsys):
    worker = answer_next_job(endpoint, {"output": GENERATED})
    rc = cli.main(
        [
            "chat",
            "--url",
            endpoint.url,
            "--adapter",
            "trained-1",
            "--message",
            "I am scared",
            "--poll-s",
            "0.05",
        ]
    )
    worker.join(10)
    assert rc == 0
    assert worker.seen == {  # type: ignore[attr-defined]
        "task": "generate",
        "adapter": "trained-1",
        "messages": [[{"role": "user", "content": "I am scared"}]],
    }
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "adapter trained-1 on org/m",
        "",
        "[1] user: I am scared",
        "adapter: Let's look at it together.  (7 tokens, 0.4 s)",
        "   base: ore months [cut at max_new_tokens]  (7 tokens, 0.4 s)",
    ]


def test_list_prints_a_table_and_a_failed_job_exits_1_with_its_reason(endpoint, capsys):
    worker = answer_next_job(endpoint, {"output": LISTED})
    assert cli.main(["list", "--url", endpoint.url, "--limit", "5", "--poll-s", "0.05"]) == 0
    worker.join(10)
    assert worker.seen == {"task": "list", "limit": 5}  # type: ignore[attr-defined]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "JOB",
        "TRAINED",
        "BASE",
        "DATASET",
        "VERDICT",
        "HELD-OUT",
        "LOSS",
        "ON",
        "VOLUME",
    ]
    assert lines[1].split() == ["trained-1", "2026-11-02T10:00", "org/m", "brightrun@4.0.0", "improved", "2.0000",
                                "->", "1.8000", "yes"]  # fmt: skip

    error = "adapter: job 'nope' has no result yet: it is running, or it stopped before writing one"
    worker = answer_next_job(
        endpoint, {"output": {"status": "failed", "error_message": error}, "error": error}
    )
    assert (
        cli.main(["chat", "--url", endpoint.url, "--adapter", "nope", "--message", "hi", "--poll-s", "0.05"])
        == 1
    )
    worker.join(10)
    assert capsys.readouterr().err.splitlines()[-1] == f"FAILED: {error}"


@pytest.mark.e2e
def test_chat_and_list_through_the_production_worker(tmp_path, tiny_model, capsys):
    """`python handler.py` against the local endpoint: a real generate job on a saved adapter folder."""
    model, _ = add_lora(
        load_base_model(tiny_model), r=8, alpha=16, dropout=0.0, seed=1, gradient_checkpointing=False
    )
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    adapter = save_adapter(model, load_tokenizer(tiny_model), tmp_path / "volume" / "adapters" / "mine")
    ep = LocalEndpoint(requeue_after_s=120.0).start()
    env = {
        **os.environ,
        **ep.worker_env(f"w-{uuid.uuid4().hex[:6]}", tmp_path / "volume"),
        "PROGRESS_INTERVAL_S": "0",
    }
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-u", "handler.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        rc = cli.main(
            ["chat", "--url", ep.url, "--adapter", "adapters/mine", "--message", "I feel behind on retirement",
             "--max-new-tokens", "8", "--compare-base", "--poll-s", "0.2"]
        )  # fmt: skip
        captured = capsys.readouterr()
        assert rc == 0, captured.err + log.read_text(errors="replace")[-3000:]
        lines = captured.out.splitlines()
        assert lines[0] == f"adapter {adapter} on {tiny_model}"
        assert lines[2] == "[1] user: I feel behind on retirement"
        assert lines[3].startswith("adapter: ") and lines[4].startswith("   base: ")
        assert "model_loading" in captured.err or "model_loaded" in captured.err  # progress was drawn
        assert cli.main(["list", "--url", ep.url, "--poll-s", "0.2"]) == 0
        assert "(no trained adapters on the volume)" in capsys.readouterr().out
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        ep.close()
