"""The terminal client: job input from flags, the progress line, exit codes, against a real local endpoint."""

from __future__ import annotations

import argparse
import io
import json
import socket
import threading

import pytest

from lora_worker.runtime.spec import Hyperparameters
from lora_worker.tools import client as cli
from lora_worker.tools.local_endpoint import LocalEndpoint

EVENT = {
    "status": "training",
    "step": 12,
    "total_steps": 48,
    "percent": 25.0,
    "eta_seconds": 65,
    "metrics": {"loss": 1.23456},
    "cost_usd": 0.0123,
}


@pytest.fixture
def endpoint():
    ep = LocalEndpoint(requeue_after_s=5.0, take_wait_s=0.2).start()
    yield ep
    ep.close()


def _args(*argv: str):
    return cli._parser().parse_args(["submit", *argv])


def test_flags_build_the_input_and_override_the_json(tmp_path):
    spec = tmp_path / "in.json"
    spec.write_text(
        json.dumps({"input": {"dataset_path": "x.json", "hyperparameters": {"num_epochs": 3, "lora_r": 8}}})
    )
    job = cli.build_input(
        _args(
            "--input-json", str(spec), "--dataset", "https://s.example/d.json", "--epochs", "1", "--lr", "0.001",
            "--grad-accum", "2", "--job-id", "j1", "--webhook-url", "https://h.example/w", "--base-model", "org/m",
        ),
        local=False,
    )  # fmt: skip
    assert job == {
        "dataset_url": "https://s.example/d.json",
        "hyperparameters": {
            "num_epochs": 1,
            "lora_r": 8,
            "learning_rate": 0.001,
            "gradient_accumulation_steps": 2,
        },
        "job_id": "j1",
        "webhook_url": "https://h.example/w",
        "base_model": "org/m",
    }


def test_local_paths_go_absolute_only_for_a_local_endpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text("[]")
    assert cli.build_input(_args("--dataset", "d.json"), local=True)["dataset_path"] == str(
        tmp_path / "d.json"
    )
    assert (
        cli.build_input(_args("--dataset", "d.json"), local=False)["dataset_path"] == "d.json"
    )  # on the volume
    with pytest.raises(cli.ClientError, match="no dataset"):
        cli.build_input(_args("--epochs", "1"), local=True)


def test_progress_line():
    line = cli.progress_line({"status": "IN_PROGRESS", "output": EVENT})
    assert line.split() == (
        "training step 12/48 [#####...............] 25.0% loss 1.2346 ETA 1m05s $0.0123".split()
    )
    assert (
        cli.progress_line({"status": "IN_QUEUE", "retries": 1}) == "IN_QUEUE  waiting for a worker, retry 1"
    )


def test_tty_rewrites_one_line_and_pipes_print_changes():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for out in (tty, pipe):
        view = cli.ProgressView(out)
        for st in (
            {"status": "IN_QUEUE"},
            {"status": "IN_QUEUE"},
            {"status": "IN_PROGRESS", "output": EVENT},
        ):
            view(st)
        view.end()
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("\n")
    assert len(pipe.getvalue().splitlines()) == 2  # the repeated IN_QUEUE is not printed again


def test_client_errors_exit_3_with_one_line(capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["status", "--url", f"http://127.0.0.1:{port}/v2/local", "abc"]) == 3
    monkeypatch.delenv("RUNPOD_ENDPOINT_ID", raising=False)
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    assert cli.main(["status", "abc"]) == 3
    assert cli.main(["status", "--endpoint-id", "ep1", "abc"]) == 3
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: cannot reach http://127.0.0.1:{port}/v2/local: ConnectionError",
        "error: no endpoint: give --url (local) or --endpoint-id (or set RUNPOD_ENDPOINT_ID)",
        "error: RUNPOD_API_KEY is not set; RunPod's API needs it",
    ]
    assert cli.main(["status"]) == 3  # a usage error; argparse's own 2 would read as CANCELLED


def test_status_cancel_and_wait_exit_codes(endpoint, tmp_path, capsys):
    url = endpoint.url
    assert cli.main(["status", "--url", url, "nope"]) == 3
    assert "HTTP 404" in capsys.readouterr().err
    assert cli.main(["submit", "--url", url, "--dataset", "https://s.example/d.json"]) == 0
    job_id = json.loads(capsys.readouterr().out)["id"]
    assert cli.main(["status", "--url", url, job_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "IN_QUEUE"

    # --wait on a job cancelled from elsewhere ends with exit 2 and the status JSON.
    def cancel_soon() -> None:
        while not endpoint.state.jobs or len(endpoint.state.jobs) < 2:
            threading.Event().wait(0.05)
        second = list(endpoint.state.jobs)[-1]
        assert cli.EndpointClient(url).cancel(second)["status"] == "CANCELLED"

    t = threading.Thread(target=cancel_soon)
    t.start()
    rc = cli.main(
        ["submit", "--url", url, "--dataset", "https://s.example/d.json", "--wait", "--poll-s", "0.1"]
    )
    t.join()
    captured = capsys.readouterr()
    assert rc == 2 and json.loads(captured.out)["status"] == "CANCELLED"
    assert captured.err.splitlines()[-1] == "CANCELLED"
    assert cli.main(["cancel", "--url", url, job_id]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": job_id, "status": "CANCELLED"}


def test_job_policy_covers_the_jobs_own_time_limit():
    from lora_worker.tools.client import job_policy

    assert job_policy({"dataset_path": "x"}) == {"executionTimeout": 25 * 3_600_000, "ttl": 48 * 3_600_000}
    assert job_policy({"max_duration_hours": 30}) == {
        "executionTimeout": 31 * 3_600_000,
        "ttl": 54 * 3_600_000,
    }


@pytest.mark.parametrize("command", ["submit", "status", "cancel"])
def test_help_describes_every_argument_and_shows_defaults(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert sub.description and sub.description.split()[0] in text
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in " ".join(text.split()), action.dest
    if command == "submit":
        flat = " ".join(text.split())
        assert "(default: 1.5)" in flat  # --poll-s
        # Flags that leave the job input alone name what the job then uses, from the job spec itself.
        assert f"(job default: {Hyperparameters().num_epochs})" in flat
        assert f"(job default: {Hyperparameters().learning_rate})" in flat
        assert "(default: None)" not in flat
