"""`python -m lora_worker local-endpoint`: RunPod's queue endpoint, both sides, on loopback.

The dashboard side is the public API (`/v2/<endpoint>/run`, `/status/<id>`, `/cancel/<id>`, `/health`,
`/runsync`, `/stream/<id>`, `/purge-queue`); the worker side is exactly what runpod SDK 1.12's worker
loop calls: `job-take` (long-poll; the job JSON or 204), `job-done` (progress as
`{"status": "IN_PROGRESS", "output": ...}`, then the result `{"output": ...}` or `{"error": ...}`),
`job-stream`, `job-stop` (long-poll; `{"jobsToStop": [ids]}` or 204) and `ping`. So the production
worker (`python handler.py` with the `RUNPOD_WEBHOOK_*` variables pointed here) runs unchanged.

Like the real service, a job whose worker disappears goes back to the queue with the same id, and a
late progress update never overwrites a final status. The limits against the real service are listed
in docs/local.md. State is in memory only: restarting the endpoint forgets every job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# runpod SDK 1.12 pings every RUNPOD_PING_INTERVAL ms (default 10000); loopback can afford more often,
# which lets a dead worker's job be requeued sooner.
WORKER_PING_INTERVAL_MS = 2000


@dataclass
class JobRecord:
    id: str
    input: Any
    webhook: str | None
    submitted: float  # time.monotonic() seconds, like every time below
    execution_timeout_s: float | None = None
    status: str = "IN_QUEUE"
    worker_id: str | None = None
    first_started: float | None = None
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: Any = None
    stream: list[Any] = field(default_factory=list)
    retries: int = 0  # times a dead worker's job went back to the queue
    progress_updates: int = 0
    ignored_posts: int = 0  # late or stale posts dropped (after a final status, or from a former holder)

    def view(self, now: float) -> dict:
        """The body of GET /status/<id>, in the public API's shape (times in milliseconds)."""
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.first_started is not None:
            out["delayTime"] = int((self.first_started - self.submitted) * 1000)
        if self.started is not None:
            out["executionTime"] = int(((self.finished or now) - self.started) * 1000)
        if self.worker_id:
            out["workerId"] = self.worker_id
        if self.output is not None:
            out["output"] = self.output
        if self.error is not None:
            out["error"] = self.error
        if self.retries:
            out["retries"] = self.retries
        return out


@dataclass
class WorkerRecord:
    id: str
    last_seen: float
    stop: list[str] = field(default_factory=list)  # job ids waiting for its next job-stop poll
    unhealthy: str | None = None
    gone: bool = False


class QueueState:
    """The endpoint's jobs and workers; every method is thread-safe (one lock, one condition)."""

    def __init__(self, *, requeue_after_s: float = 10.0, clock=time.monotonic):
        self.requeue_after_s = requeue_after_s
        self.clock = clock
        self.jobs: dict[str, JobRecord] = {}
        self.queue: deque[str] = deque()
        self.workers: dict[str, WorkerRecord] = {}
        self.cond = threading.Condition()
        self.closing = False
        self.on_final: list[Any] = []  # callback(job, status view) when a job reaches a final status

    # ------------------------------------------------------------------ dashboard side

    def submit(self, job_input: Any, *, webhook: str | None = None, policy: dict | None = None) -> dict:
        timeout_ms = policy.get("executionTimeout") if isinstance(policy, dict) else None
        with self.cond:
            job = JobRecord(
                id=f"{uuid.uuid4()}-local",
                input=job_input,
                webhook=webhook,
                submitted=self.clock(),
                execution_timeout_s=float(timeout_ms) / 1000 if timeout_ms else None,
            )
            self.jobs[job.id] = job
            self.queue.append(job.id)
            self.cond.notify_all()
            log.info("job %s queued", job.id)
            return {"id": job.id, "status": job.status}

    def status(self, job_id: str) -> dict | None:
        with self.cond:
            self._sweep()
            job = self.jobs.get(job_id)
            return job.view(self.clock()) if job else None

    def wait_final(self, job_id: str, timeout_s: float) -> dict | None:
        """Block until the job is final or timeout_s passes (for /runsync); returns its status."""
        deadline = self.clock() + timeout_s
        with self.cond:
            while True:
                self._sweep()
                job = self.jobs.get(job_id)
                if job is None:
                    return None
                left = deadline - self.clock()
                if job.status in FINAL or left <= 0 or self.closing:
                    return job.view(self.clock())
                self.cond.wait(min(left, 1.0))  # wake each second to sweep dead workers

    def cancel(self, job_id: str) -> dict | None:
        with self.cond:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.status == "IN_QUEUE":
                self.queue.remove(job_id)
                self._finish(job, "CANCELLED")
            elif job.status == "IN_PROGRESS":
                worker = self.workers.get(job.worker_id or "")
                if worker is not None:
                    worker.stop.append(job_id)  # delivered on the worker's job-stop long-poll
                self._finish(job, "CANCELLED")
            self.cond.notify_all()
            return {"id": job.id, "status": job.status}

    def purge_queue(self) -> dict:
        with self.cond:
            removed = list(self.queue)
            for job_id in removed:
                self._finish(self.jobs[job_id], "CANCELLED")
            self.queue.clear()
            return {"removed": len(removed), "status": "completed"}

    def health(self) -> dict:
        with self.cond:
            self._sweep()
            by_status = [j.status for j in self.jobs.values()]
            holders = {j.worker_id for j in self.jobs.values() if j.status == "IN_PROGRESS"}
            live = [w for w in self.workers.values() if not w.gone]
            return {
                "jobs": {
                    "completed": by_status.count("COMPLETED"),
                    "failed": by_status.count("FAILED"),
                    "inProgress": by_status.count("IN_PROGRESS"),
                    "inQueue": by_status.count("IN_QUEUE"),
                    "retried": sum(j.retries for j in self.jobs.values()),
                },
                "workers": {
                    "idle": sum(1 for w in live if w.id not in holders and not w.unhealthy),
                    "running": sum(1 for w in live if w.id in holders),
                    "unhealthy": sum(1 for w in live if w.unhealthy),
                },
            }

    # ------------------------------------------------------------------ worker side

    def take(self, worker_id: str, *, job_in_progress: bool, wait_s: float, batch: int = 1) -> list[dict]:
        """Hand the worker up to `batch` queued jobs, waiting up to wait_s for one (long-poll)."""
        deadline = self.clock() + wait_s
        with self.cond:
            worker = self._seen(worker_id)
            if not job_in_progress:
                # The worker says it runs nothing, so a job we think it holds was lost with the process
                # (a restarted container keeps its pod id): run it again.
                for job in self.jobs.values():
                    if job.status == "IN_PROGRESS" and job.worker_id == worker_id:
                        self._requeue(job, "its worker asked for new work without finishing it")
            while True:
                self._sweep()
                if self.queue or self.closing or worker.gone or self.clock() >= deadline:
                    break
                self.cond.wait(min(deadline - self.clock(), 1.0))
            taken: list[dict] = []
            # A worker declared gone while its poll was held gets nothing: its process is probably dead.
            while self.queue and len(taken) < batch and not self.closing and not worker.gone:
                job = self.jobs[self.queue.popleft()]
                now = self.clock()
                job.status, job.worker_id, job.started, job.finished = "IN_PROGRESS", worker.id, now, None
                job.first_started = job.first_started or now
                job.output = job.error = None
                taken.append({"id": job.id, "input": job.input})
                log.info("job %s taken by worker %s", job.id, worker.id)
            self._still_there(worker)
            return taken

    def handback(self, worker_id: str, job_ids: list[str]) -> None:
        """A take response never reached the worker (it hung up): those jobs go back to the queue."""
        with self.cond:
            for job_id in job_ids:
                job = self.jobs.get(job_id)
                if job and job.status == "IN_PROGRESS" and job.worker_id == worker_id:
                    self._requeue(job, "the job-take response could not be delivered")

    def post(self, worker_id: str, job_id: str, body: Any, *, stream: bool = False) -> dict:
        """A job-done or job-stream POST: a progress update, a stream chunk, or the final result."""
        with self.cond:
            self._seen(worker_id)
            job = self.jobs.get(job_id)
            if job is None:
                return {"ignored": "unknown job"}
            if job.status != "IN_PROGRESS" or job.worker_id != worker_id:
                # The real service drops these too: a final status is final, and a requeued job belongs
                # to its new worker.
                job.ignored_posts += 1
                why = f"job is {job.status}" if job.status != "IN_PROGRESS" else "worker no longer holds it"
                log.info("job %s: ignored a post from worker %s (%s)", job_id, worker_id, why)
                return {"ignored": why}
            body = body if isinstance(body, dict) else {"output": body}
            if stream:
                job.stream.append(body.get("output"))
            elif body.get("status") == "IN_PROGRESS":
                job.output = body.get("output")
                job.progress_updates += 1
            elif body.get("error") is not None:
                job.output = body.get("output")
                job.error = body["error"]
                self._finish(job, "FAILED")
            else:
                job.output = body.get("output")
                self._finish(job, "COMPLETED")
            self.cond.notify_all()
            return {"status": job.status}

    def stop_signals(self, worker_id: str, wait_s: float) -> list[str]:
        deadline = self.clock() + wait_s
        with self.cond:
            worker = self._seen(worker_id)
            while not worker.stop and not self.closing and not worker.gone and self.clock() < deadline:
                self._sweep()
                self.cond.wait(min(deadline - self.clock(), 1.0))
            ids, worker.stop = worker.stop, []
            self._still_there(worker)
            return ids

    def ping(self, worker_id: str, params: dict[str, str]) -> None:
        with self.cond:
            worker = self._seen(worker_id)
            if params.get("status") == "unhealthy":  # a failed fitness check, reported before exiting
                worker.unhealthy = f"{params.get('check')}: {params.get('reason')}"
                log.warning("worker %s reported unhealthy: %s", worker_id, worker.unhealthy)

    def worker_gone(self, worker_id: str) -> None:
        """The supervisor saw the process exit: requeue its job now instead of after the timeout."""
        with self.cond:
            worker = self.workers.get(worker_id)
            if worker is not None:
                worker.gone = True
            for job in self.jobs.values():
                if job.status == "IN_PROGRESS" and job.worker_id == worker_id:
                    self._requeue(job, "its worker process exited")
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    # ------------------------------------------------------------------ internals (lock held)

    def _seen(self, worker_id: str) -> WorkerRecord:
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = self.workers[worker_id] = WorkerRecord(worker_id, self.clock())
            log.info("worker %s connected", worker_id)
        worker.last_seen, worker.gone = self.clock(), False
        return worker

    def _still_there(self, worker: WorkerRecord) -> None:
        # The end of a held poll: the worker was there when it began. A request that outlives its
        # (killed) client must not bring a worker declared gone back to life; its next request will.
        if not worker.gone:
            worker.last_seen = self.clock()

    def _sweep(self) -> None:
        now = self.clock()
        for worker in self.workers.values():
            if not worker.gone and now - worker.last_seen > self.requeue_after_s:
                worker.gone = True
                log.warning("worker %s silent for %.0f s: gone", worker.id, now - worker.last_seen)
        for job in self.jobs.values():
            if job.status != "IN_PROGRESS":
                continue
            worker = self.workers.get(job.worker_id or "")
            if worker is None or worker.gone:
                self._requeue(job, f"worker {job.worker_id} stopped answering")
            elif job.execution_timeout_s and now - (job.started or now) > job.execution_timeout_s:
                worker.stop.append(job.id)
                self._finish(job, "TIMED_OUT")

    def _requeue(self, job: JobRecord, why: str) -> None:
        log.warning("job %s back to the queue: %s", job.id, why)
        job.status, job.worker_id, job.started, job.output = "IN_QUEUE", None, None, None
        job.retries += 1
        self.queue.appendleft(job.id)  # it was first in line once; it goes first again
        self.cond.notify_all()

    def _finish(self, job: JobRecord, status: str) -> None:
        job.status, job.finished = status, self.clock()
        log.info("job %s %s", job.id, status)
        self.cond.notify_all()  # /runsync waiters, and a job-stop poll when a stop signal was queued
        view = job.view(job.finished)
        for callback in self.on_final:
            callback(job, view)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, so a held long-poll never pins a keep-alive socket.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        ep = self.server.endpoint
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        if len(parts) < 3 or parts[0] != "v2" or parts[1] != ep.endpoint_id:
            return self._json(
                404, {"error": f"no such endpoint: {url.path} (this one is /v2/{ep.endpoint_id})"}
            )
        op, args = parts[2], parts[3:]
        state = ep.state
        try:
            if method == "POST" and op in ("run", "runsync") and not args:
                body = self._body()
                if not isinstance(body, dict) or "input" not in body:
                    return self._json(400, {"error": 'the body must be a JSON object with an "input" field'})
                accepted = state.submit(body["input"], webhook=body.get("webhook"), policy=body.get("policy"))
                if op == "run":
                    return self._json(200, accepted)
                wait_s = min(float(query.get("wait", 90000)) / 1000, 300.0)  # ms, as the real API
                return self._json(200, state.wait_final(accepted["id"], wait_s))
            if op in ("status", "stream") and len(args) == 1:
                view = state.status(args[0])
                if view is None:
                    return self._json(404, {"error": f"no such job: {args[0]}"})
                if op == "stream":
                    job = state.jobs[args[0]]
                    view = {"id": job.id, "status": view["status"], "stream": list(job.stream)}
                return self._json(200, view)
            if method == "POST" and op == "cancel" and len(args) == 1:
                res = state.cancel(args[0])
                return self._json(200, res) if res else self._json(404, {"error": f"no such job: {args[0]}"})
            if method == "POST" and op == "purge-queue":
                return self._json(200, state.purge_queue())
            if op == "health":
                return self._json(200, state.health())
            if method == "GET" and op in ("job-take", "job-take-batch") and len(args) == 1:
                batch = int(query.get("batch_size", 1)) if op == "job-take-batch" else 1
                jobs = state.take(
                    args[0],
                    job_in_progress=query.get("job_in_progress") == "1",
                    wait_s=ep.take_wait_s,
                    batch=batch,
                )
                if not jobs:
                    return self._empty()
                try:
                    return self._json(200, jobs if op == "job-take-batch" else jobs[0])
                except OSError:  # the worker hung up while we held its poll
                    return state.handback(args[0], [j["id"] for j in jobs])
            if method == "GET" and op == "job-stop" and len(args) == 1:
                ids = state.stop_signals(args[0], ep.stop_wait_s)
                return self._json(200, {"jobsToStop": ids}) if ids else self._empty()
            if method == "POST" and op in ("job-done", "job-stream") and len(args) == 2:
                stream = op == "job-stream" or query.get("isStream") == "true"
                return self._json(200, state.post(args[0], args[1], self._body(), stream=stream))
            if method == "GET" and op == "ping" and len(args) == 1:
                state.ping(args[0], query)
                return self._json(200, {"ok": True})
        except (ValueError, json.JSONDecodeError) as err:
            return self._json(400, {"error": f"bad request: {err}"})
        return self._json(404, {"error": f"no route for {method} {url.path}"})

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        # The SDK posts JSON under `Content-Type: application/x-www-form-urlencoded`; parse it as JSON anyway.
        return json.loads(raw.decode("utf-8")) if raw else None

    def _json(self, code: int, obj: Any) -> None:
        data = json.dumps(obj, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _empty(self) -> None:
        self.send_response(HTTPStatus.NO_CONTENT)
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    endpoint: LocalEndpoint


class LocalEndpoint:
    """The HTTP server around a QueueState; `start()` serves from a background thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        endpoint_id: str = "local",
        requeue_after_s: float = 10.0,
        take_wait_s: float = 2.0,
        stop_wait_s: float = 5.0,
    ):
        self.endpoint_id = endpoint_id
        # A held long-poll does not count as a sign of life until it returns, so it must stay well
        # under the silence that requeues a worker's job.
        self.take_wait_s = min(take_wait_s, requeue_after_s / 3)
        self.stop_wait_s = min(stop_wait_s, requeue_after_s / 3)
        self.state = QueueState(requeue_after_s=requeue_after_s)
        self.state.on_final.append(self._send_webhook)
        self.httpd = _Server((host, port), _Handler)
        self.httpd.endpoint = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        """The API base, e.g. http://127.0.0.1:8000/v2/local."""
        host = self.httpd.server_address[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}/v2/{self.endpoint_id}"

    def start(self) -> LocalEndpoint:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="local-endpoint", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.state.close()  # releases held long-polls
        self.httpd.shutdown()
        self.httpd.server_close()

    def worker_env(self, worker_id: str, volume_dir: str | Path | None = None) -> dict[str, str]:
        return worker_env(self.url, self.endpoint_id, worker_id, volume_dir)

    def _send_webhook(self, job: JobRecord, view: dict) -> None:
        # The /run body's `webhook`: RunPod POSTs the final status there (with retries).
        if job.webhook:
            threading.Thread(target=_post_webhook, args=(job.webhook, view), daemon=True).start()


def _post_webhook(url: str, body: dict) -> None:
    import requests

    for delay_s in (0, 2, 10):
        time.sleep(delay_s)
        try:
            if requests.post(url, json=body, timeout=10).ok:
                return
        except requests.RequestException as err:
            log.warning("webhook %s: %s", url.split("?")[0], type(err).__name__)
    log.warning("webhook %s: gave up after 3 tries", url.split("?")[0])


def worker_env(
    base_url: str, endpoint_id: str, worker_id: str, volume_dir: str | Path | None = None
) -> dict[str, str]:
    """The environment RunPod gives a worker, pointed at a local endpoint (merge onto os.environ).

    `$ID` and `$RUNPOD_POD_ID` are left for the SDK to fill in, as on RunPod; the `?gpu=` query is
    there because the SDK appends its own parameters with `&`.
    """
    env = {
        "RUNPOD_WEBHOOK_GET_JOB": f"{base_url}/job-take/$ID?gpu=local",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base_url}/job-done/$RUNPOD_POD_ID/$ID?gpu=local",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{base_url}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local",
        "RUNPOD_WEBHOOK_PING": f"{base_url}/ping/$RUNPOD_POD_ID?gpu=local",
        "RUNPOD_PING_INTERVAL": str(WORKER_PING_INTERVAL_MS),
        "RUNPOD_AI_API_KEY": "local-endpoint-dummy-key",  # the SDK only pings when some key is set
        "RUNPOD_POD_ID": worker_id,
        "RUNPOD_ENDPOINT_ID": endpoint_id,
        # The SDK's start-up system checks include a TCP connect to 8.8.8.8:53, which fails offline
        # and says nothing about a laptop; the GPU checks still run where there is a GPU.
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        "PYTHONUNBUFFERED": "1",
    }
    if volume_dir is not None:
        env["VOLUME_DIR"] = str(Path(volume_dir).absolute())
    return env


def default_handler_path() -> Path:
    """handler.py at the repository root (src/lora_worker/ -> repo), else in the current directory."""
    repo_handler = Path(__file__).resolve().parents[2] / "handler.py"
    return repo_handler if repo_handler.is_file() else Path("handler.py").absolute()


class WorkerSupervisor:
    """Runs `python handler.py` in production mode against the endpoint; restarts it if it dies."""

    # Give up after this many exits within FAST_EXIT_S of starting: it is broken, not unlucky.
    MAX_FAST_EXITS = 3
    FAST_EXIT_S = 20.0

    def __init__(self, endpoint: LocalEndpoint, *, handler: Path, cwd: Path, volume_dir: Path):
        self.endpoint, self.handler, self.cwd, self.volume_dir = endpoint, handler, cwd, volume_dir
        self.proc: subprocess.Popen | None = None
        self.worker_id = ""
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        # A fresh pod id per process: the endpoint can tell the new worker from the dead one.
        self.worker_id = f"local-worker-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, **self.endpoint.worker_env(self.worker_id, self.volume_dir)}
        env.setdefault("RUNPOD_LOG_LEVEL", "INFO")  # the SDK defaults to DEBUG: a line per second when idle
        log.info("starting worker %s: %s %s (cwd %s)", self.worker_id, sys.executable, self.handler, self.cwd)
        # Own session: Ctrl-C on the endpoint's terminal does not reach it; stop() ends its whole group.
        return subprocess.Popen(
            [sys.executable, "-u", str(self.handler)], cwd=self.cwd, env=env, start_new_session=True
        )

    def _run(self) -> None:
        fast_exits = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            self.proc = self._spawn()
            code = self.proc.wait()
            _kill_group(self.proc)  # its ping process outlives it otherwise, and would keep it "alive"
            if self._stopping.is_set():
                return
            self.endpoint.state.worker_gone(self.worker_id)
            fast_exits = fast_exits + 1 if time.monotonic() - started < self.FAST_EXIT_S else 0
            if fast_exits >= self.MAX_FAST_EXITS:
                log.error(
                    "worker exited %d times right after starting (last code %s); not restarting",
                    fast_exits,
                    code,
                )
                return
            log.warning("worker %s exited with code %s; restarting in 2 s", self.worker_id, code)
            self._stopping.wait(2.0)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after grace_s: the SDK drains a running job on SIGTERM, which for a
        training job could take hours, and a checkpointed job resumes when it runs again."""
        self._stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
        _kill_group(proc)
        proc.wait()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL whatever is left of the worker's process group, as stopping a container does."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lora_worker local-endpoint",
        description="Serve RunPod's queue endpoint (public API and worker protocol) on loopback.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (no auth: keep it loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint-id", default="local", help="the <endpoint> in /v2/<endpoint>/...")
    p.add_argument("--worker", action="store_true", help="also run handler.py as a production worker")
    p.add_argument(
        "--volume", default=None, help="the worker's VOLUME_DIR (default: $VOLUME_DIR or ./.volume)"
    )
    p.add_argument("--handler", type=Path, default=None, help="handler.py to run (default: the repo's)")
    p.add_argument(
        "--requeue-after-s",
        type=float,
        default=10.0,
        help="seconds without any request from a worker before its job goes back to the queue",
    )
    p.add_argument("--take-wait-s", type=float, default=2.0, help="job-take long-poll hold, seconds")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: this endpoint has no authentication", a.host)
    try:
        endpoint = LocalEndpoint(
            host=a.host,
            port=a.port,
            endpoint_id=a.endpoint_id,
            requeue_after_s=a.requeue_after_s,
            take_wait_s=a.take_wait_s,
        )
    except OSError as err:
        print(f"local-endpoint: cannot listen on {a.host}:{a.port}: {err.strerror}", file=sys.stderr)
        return 3
    endpoint.start()
    supervisor = None
    worker_note = "none; start one with --worker or point handler.py at it (docs/local.md)"
    if a.worker:
        volume = Path(a.volume or os.environ.get("VOLUME_DIR") or ".volume").absolute()
        handler = (a.handler or default_handler_path()).absolute()
        if not handler.is_file():
            print(f"local-endpoint: no handler at {handler}; pass --handler", file=sys.stderr)
            endpoint.close()
            return 3
        supervisor = WorkerSupervisor(endpoint, handler=handler, cwd=Path.cwd(), volume_dir=volume).start()
        worker_note = f"handler.py, cwd {Path.cwd()}, VOLUME_DIR {volume}"
    print(
        f"local endpoint: {endpoint.url}\nworker: {worker_note}\n"
        f"submit: python -m lora_worker submit --url {endpoint.url} --dataset PATH --base-model PATH --wait",
        file=sys.stderr,
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):  # a timed wait, so the signal handler runs promptly
        pass
    log.info("shutting down")
    if supervisor is not None:
        supervisor.stop()
    endpoint.close()
    return 0
