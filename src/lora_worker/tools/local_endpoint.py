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
import json
import logging
import os
import signal
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from lora_worker.cli import invocation
from lora_worker.runtime.net import redact_url
from lora_worker.tools.local_queue import JobRecord, QueueState
from lora_worker.tools.local_worker import WorkerSupervisor, default_handler_path, worker_env

log = logging.getLogger(__name__)


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
    """POST the final status, retried after 2 s and 10 s; the URL is logged without its query."""
    for delay_s in (0, 2, 10):
        time.sleep(delay_s)
        try:
            if requests.post(url, json=body, timeout=10).ok:
                return
        except requests.RequestException as err:
            log.warning("webhook %s: %s", redact_url(url), type(err).__name__)
    log.warning("webhook %s: gave up after 3 tries", redact_url(url))


def _parser() -> argparse.ArgumentParser:
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
    return p


def _wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):  # a timed wait, so the signal handler runs promptly
        pass


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
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
        f"submit: {invocation()} submit --url {endpoint.url} --dataset PATH --base-model PATH --wait",
        file=sys.stderr,
        flush=True,
    )
    _wait_for_stop_signal()
    log.info("shutting down")
    if supervisor is not None:
        supervisor.stop()
    endpoint.close()
    return 0
