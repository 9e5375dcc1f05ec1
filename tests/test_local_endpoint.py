"""The local endpoint against the real runpod SDK worker (`python handler.py` in production mode).

The protocol tests at the top speak the SDK's wire format directly and take a second; the e2e tests
run the whole production loop (job-take, progress, job-done, job-stop, ping) on the tiny model:
completion, cancellation mid-training, SIGKILL mid-training with requeue and resume, and bad input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from conftest import REPO, SAMPLE, merge_groups, small_job

from lora_worker.tools import client as cli
from lora_worker.tools.client import EndpointClient
from lora_worker.tools.local_endpoint import LocalEndpoint

# Every e2e wait is bounded by this (seconds): a few times what a job takes on a 2-core CPU.
JOB_TIMEOUT_S = 240


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture
def endpoint() -> Iterator[LocalEndpoint]:
    ep = LocalEndpoint(requeue_after_s=1.0, take_wait_s=0.2, stop_wait_s=0.2).start()
    yield ep
    ep.close()


def _worker_get(ep: LocalEndpoint, op: str, worker: str, **params: str) -> requests.Response:
    # The SDK's URLs: `<base>/<op>/<worker>?gpu=local&...`.
    return requests.get(f"{ep.url}/{op}/{worker}", params={"gpu": "local", **params}, timeout=10)


def _worker_post(ep: LocalEndpoint, worker: str, job_id: str, body: dict) -> requests.Response:
    # As rp_http._transmit: JSON text under a form content type, `&isStream=false` appended.
    return requests.post(
        f"{ep.url}/job-done/{worker}/{job_id}?gpu=local&isStream=false",
        data=json.dumps(body),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )


# ------------------------------------------------------------------------------------ protocol


def test_take_progress_result_and_late_progress_is_ignored(endpoint):
    api = EndpointClient(endpoint.url)
    assert _worker_get(endpoint, "job-take", "w1", job_in_progress="0").status_code == 204
    job = api.submit({"x": 1})
    assert job["status"] == "IN_QUEUE"
    took = _worker_get(endpoint, "job-take", "w1", job_in_progress="0")
    assert took.status_code == 200 and took.json() == {"id": job["id"], "input": {"x": 1}}
    assert took.headers["Content-Type"] == "application/json"

    _worker_post(endpoint, "w1", job["id"], {"status": "IN_PROGRESS", "output": {"step": 1}})
    st = api.status(job["id"])
    assert st["status"] == "IN_PROGRESS" and st["output"] == {"step": 1} and st["workerId"] == "w1"
    assert "delayTime" in st and "executionTime" in st

    _worker_post(endpoint, "w1", job["id"], {"output": {"done": True}})
    late = _worker_post(endpoint, "w1", job["id"], {"status": "IN_PROGRESS", "output": {"step": 2}})
    assert late.status_code == 200  # accepted so the SDK does not retry, then dropped
    st = api.status(job["id"])
    assert st["status"] == "COMPLETED" and st["output"] == {"done": True}
    assert api.health()["jobs"]["completed"] == 1


def test_error_result_is_failed_with_the_error(endpoint):
    api = EndpointClient(endpoint.url)
    job = api.submit({})
    _worker_get(endpoint, "job-take", "w1", job_in_progress="0")
    _worker_post(endpoint, "w1", job["id"], {"output": {"status": "failed"}, "error": "lr: bad"})
    st = api.status(job["id"])
    assert (st["status"], st["error"], st["output"]) == ("FAILED", "lr: bad", {"status": "failed"})


def test_cancel_reaches_the_worker_on_its_stop_poll(endpoint):
    api = EndpointClient(endpoint.url)
    queued, running = api.submit({"n": 1}), api.submit({"n": 2})
    assert api.cancel(queued["id"])["status"] == "CANCELLED"  # never handed out
    took = _worker_get(endpoint, "job-take", "w1", job_in_progress="0").json()
    assert took["id"] == running["id"]
    assert _worker_get(endpoint, "job-stop", "w1").status_code == 204
    assert api.cancel(running["id"])["status"] == "CANCELLED"
    assert _worker_get(endpoint, "job-stop", "w1").json() == {"jobsToStop": [running["id"]]}
    _worker_post(endpoint, "w1", running["id"], {"status": "IN_PROGRESS", "output": {"status": "cancelled"}})
    assert api.status(running["id"])["status"] == "CANCELLED"


def test_a_silent_workers_job_is_requeued_with_the_same_id(endpoint):
    api = EndpointClient(endpoint.url)
    job = api.submit({"n": 1})
    assert _worker_get(endpoint, "job-take", "dead", job_in_progress="0").json()["id"] == job["id"]
    time.sleep(1.5)  # longer than requeue_after_s=1 with no request from "dead"
    took = _worker_get(endpoint, "job-take", "alive", job_in_progress="0").json()
    assert took["id"] == job["id"]
    stale = _worker_post(endpoint, "dead", job["id"], {"output": {"from": "dead"}})
    assert stale.json() == {"ignored": "worker no longer holds it"}
    _worker_post(endpoint, "alive", job["id"], {"output": {"from": "alive"}})
    st = api.status(job["id"])
    assert (st["status"], st["output"], st["workerId"], st["retries"]) == (
        "COMPLETED",
        {"from": "alive"},
        "alive",
        1,
    )


def test_a_worker_asking_for_work_without_its_job_gets_it_back(endpoint):
    # A restarted container keeps its pod id and has forgotten the job it held.
    job = EndpointClient(endpoint.url).submit({"n": 1})
    assert _worker_get(endpoint, "job-take", "w1", job_in_progress="0").json()["id"] == job["id"]
    assert _worker_get(endpoint, "job-take", "w1", job_in_progress="0").json()["id"] == job["id"]


def test_execution_timeout_runsync_and_the_run_webhook(endpoint):
    got: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        body = {
            "input": {"n": 1},
            "policy": {"executionTimeout": 300},  # ms
            "webhook": f"http://127.0.0.1:{hook.server_address[1]}/hook",
        }
        st = requests.post(f"{endpoint.url}/runsync?wait=200", json=body, timeout=10).json()
        assert st["status"] == "IN_QUEUE"  # no worker within 200 ms: runsync answers with the status so far
        assert _worker_get(endpoint, "job-take", "w1", job_in_progress="0").json()["id"] == st["id"]
        time.sleep(0.5)
        assert EndpointClient(endpoint.url).status(st["id"])["status"] == "TIMED_OUT"
        assert _worker_get(endpoint, "job-stop", "w1").json() == {"jobsToStop": [st["id"]]}
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got and got[0]["id"] == st["id"] and got[0]["status"] == "TIMED_OUT"
    finally:
        hook.shutdown()


def test_unknown_job_and_endpoint_are_404(endpoint):
    assert requests.get(f"{endpoint.url}/status/nope", timeout=5).status_code == 404
    assert requests.get(endpoint.url.replace("/local", "/other") + "/health", timeout=5).status_code == 404


# ------------------------------------------------------------------------------------ e2e


@dataclass
class Worker:
    """`python handler.py` as on RunPod, in its own process group (the container)."""

    id: str
    proc: subprocess.Popen
    log: Path

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the ping process dies with it, as in a container
            self.proc.wait(30)


@dataclass
class Cluster:
    endpoint: LocalEndpoint
    volume: Path
    logs: Path
    workers: list[Worker] = field(default_factory=list)

    @property
    def api(self) -> EndpointClient:
        return EndpointClient(self.endpoint.url)

    def start_worker(self) -> Worker:
        worker_id = f"test-worker-{uuid.uuid4().hex[:6]}"
        env = {
            **os.environ,
            **self.endpoint.worker_env(worker_id, self.volume),
            "PROGRESS_INTERVAL_S": "0",  # every step reaches /status
            "RUNPOD_LOG_LEVEL": "INFO",
        }
        log = self.logs / f"{worker_id}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-u", "handler.py"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(worker_id, proc, log)
        self.workers.append(worker)
        return worker

    def logs_tail(self) -> str:
        return "\n".join(f"--- {w.id} (exit {w.proc.poll()})\n{w.tail()}" for w in self.workers)

    def result_json(self, job_id: str) -> dict:
        return json.loads((self.volume / "jobs" / job_id / "result.json").read_text())

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.endpoint.close()


def _cluster(tmp: Path, **endpoint_kw) -> Cluster:
    (tmp / "logs").mkdir(parents=True, exist_ok=True)
    return Cluster(LocalEndpoint(**endpoint_kw).start(), tmp / "volume", tmp / "logs")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Cluster]:
    """One endpoint and one worker for the completion, cancellation and bad-input tests."""
    c = _cluster(tmp_path_factory.mktemp("shared"))
    c.start_worker()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def job_of(tiny_model, small_dataset):
    """A small job (one epoch on 6 conversations) with the given groups merged in."""

    def make(**override) -> dict:
        return merge_groups(
            small_job(tiny_model, small_dataset, training={"checkpoint_steps": 50}), **override
        )

    return make


def wait_until(
    c: Cluster, what: str, check: Callable[[], object], timeout_s: float = JOB_TIMEOUT_S, every_s: float = 0.2
):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{c.logs_tail()}")


def _training_step(st: dict) -> int:
    ev = st.get("output") if st.get("status") == "IN_PROGRESS" else None
    return ev.get("step", 0) if isinstance(ev, dict) and ev.get("stage") == "training" else 0


@pytest.mark.e2e
def test_job_completes_with_progress_and_its_result_json(shared, job_of):
    job_id = shared.api.submit(job_of())["id"]
    seen: list[dict] = []
    st = shared.api.wait(job_id, poll_s=0.3, on_status=seen.append, timeout_s=JOB_TIMEOUT_S)
    assert st["status"] == "COMPLETED", f"{st}\n{shared.logs_tail()}"
    progress = [
        s["output"] for s in seen if s["status"] == "IN_PROGRESS" and isinstance(s.get("output"), dict)
    ]
    assert progress, "no IN_PROGRESS output seen"
    assert {"status", "step", "total_steps", "percent", "cost_usd"} <= set(progress[-1])
    assert st["output"] == shared.result_json(job_id)
    assert st["output"]["job_id"] == job_id and st["output"]["status"] == "completed"
    assert Path(st["output"]["report"]["markdown"]).is_file()
    assert st["delayTime"] >= 0 and st["executionTime"] > 0


@pytest.mark.e2e
def test_cancel_mid_training_then_the_same_worker_completes_the_next_job(shared, job_of, tmp_path, capsys):
    long = job_of(hyperparameters={"num_epochs": 40})
    job_id = shared.api.submit(long)["id"]
    wait_until(shared, "a training step", lambda: _training_step(shared.api.status(job_id)) >= 1)
    assert shared.api.cancel(job_id)["status"] == "CANCELLED"
    # The worker got the stop signal: the pipeline stops at the next step and records `cancelled`.
    result = shared.volume / "jobs" / job_id / "result.json"
    wait_until(shared, "the worker to stop", lambda: result.exists(), timeout_s=60)
    assert shared.result_json(job_id)["status"] == "cancelled"
    assert list((shared.volume / "jobs" / job_id / "checkpoints").glob("checkpoint-*"))
    time.sleep(1)  # its final `cancelled` progress update has been posted by now, and must be ignored
    assert shared.api.status(job_id)["status"] == "CANCELLED"
    worker = shared.api.status(job_id)["workerId"]

    # The next job, through the terminal client with --wait: exit 0 and the output on stdout.
    spec = tmp_path / "input.json"
    spec.write_text(json.dumps({"input": job_of()}))
    capsys.readouterr()
    rc = cli.main(
        ["submit", "--url", shared.endpoint.url, "--input-json", str(spec), "--wait", "--poll-s", "0.3"]
    )
    out, err = capsys.readouterr()
    assert rc == 0, f"{err}\n{shared.logs_tail()}"
    output = json.loads(out)
    assert output == shared.result_json(output["job_id"])
    assert shared.api.status(output["job_id"])["workerId"] == worker
    assert all(w.proc.poll() is None for w in shared.workers)
    assert "training" in err and "%" in err and "COMPLETED" in err  # plain progress lines, not a TTY


@pytest.mark.e2e
def test_bad_input_fails_fast_with_the_field_named(shared, tiny_model, tmp_path, capsys):
    spec = tmp_path / "bad.json"
    bad = {
        "dataset_path": str(SAMPLE),
        "base_model": str(tiny_model),
        "hyperparameters": {"learning_rate": -1},
    }
    spec.write_text(json.dumps(bad))
    capsys.readouterr()
    rc = cli.main(
        ["submit", "--url", shared.endpoint.url, "--input-json", str(spec), "--wait", "--poll-s", "0.3"]
    )
    out, err = capsys.readouterr()
    st = json.loads(out)
    assert rc == 1 and st["status"] == "FAILED", f"{out}\n{err}"
    assert "hyperparameters.learning_rate" in st["error"]
    assert "hyperparameters.learning_rate" in err  # the one-line summary names it too
    assert st["executionTime"] < 5000  # ms from take to result: rejected before any model loads


@pytest.mark.e2e
def test_sigkilled_worker_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path, job_of):
    # requeue_after_s=4: the SDK's ping (every 2 s here) and job-stop polls keep a live worker well inside it.
    c = _cluster(tmp_path, requeue_after_s=4.0)
    try:
        first = c.start_worker()
        job = job_of(hyperparameters={"num_epochs": 4}, training={"checkpoint_steps": 2})
        job_id = c.api.submit(job)["id"]
        ckpts = c.volume / "jobs" / job_id / "checkpoints"

        def checkpointed() -> int:
            done = [int(p.parent.name.split("-")[-1]) for p in ckpts.glob("checkpoint-*/CHECKPOINT_COMPLETE")]
            return max(done, default=0)

        step = wait_until(c, "the first complete checkpoint", checkpointed, every_s=0.1)
        first.kill()
        assert c.api.status(job_id)["status"] == "IN_PROGRESS"  # the endpoint has not noticed yet

        second = c.start_worker()
        st = c.api.wait(job_id, poll_s=0.5, timeout_s=JOB_TIMEOUT_S)
        assert st["status"] == "COMPLETED", f"{st}\n{c.logs_tail()}"
        assert st["workerId"] == second.id and st["retries"] >= 1
        assert st["output"]["resumed_from_step"] >= step
        assert st["output"] == c.result_json(job_id)
    finally:
        c.close()
