"""`python -m lora_worker deploy` against a real HTTP server on 127.0.0.1 standing in for RunPod's REST API.

The stand-in keeps templates and endpoints in memory, answers the routes deploy.py uses, and
behaves like the real API where it matters: it checks the Bearer key, rejects a duplicate
template name (names are unique per account), and leaves endpoint-bound templates out of
GET /templates unless `includeEndpointBoundTemplates=true` is asked for.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from lora_worker.tools import deploy

REPO = Path(__file__).resolve().parents[1]
API_KEY = "rpa_test_key_0123456789"
HF_TOKEN = "hf_super_secret_token_value_42"
WEBHOOK_SECRET = "whsec_c2VjcmV0LXNpZ25pbmcta2V5"
DAY_MS = 24 * 3600 * 1000


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeRunPod:
    """In-memory RunPod REST state plus failure injection: fail[(METHOD, path)] = (status, body)."""

    requests: list[Recorded] = field(default_factory=list)
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    fail: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    next_id: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_id(self, prefix: str) -> str:
        self.next_id += 1
        return f"{prefix}{self.next_id:04d}"

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method != "GET"]


def _handler_for(state: FakeRunPod) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, payload: Any) -> None:
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header(
                "Content-Type", "application/json" if not isinstance(payload, str) else "text/plain"
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with state.lock:
                state.requests.append(
                    Recorded(
                        self.command, split.path, parse_qs(split.query), dict(self.headers.items()), body
                    )
                )
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    return self._send(401, {"error": "invalid or missing API key"})
                injected = state.fail.get((self.command, split.path))
                if injected:
                    status, text = injected
                    return self._send(status, json.loads(text) if text.startswith("{") else text)
                status, payload = self._route(split.path, parse_qs(split.query), body)
            self._send(status, payload)

        def _route(self, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
            parts = path.strip("/").split("/")
            if parts[0] != "v1" or len(parts) < 2:
                return 404, {"error": f"no route {path}"}
            kind, ident = parts[1], (parts[2] if len(parts) > 2 else None)
            store = {"templates": state.templates, "endpoints": state.endpoints}.get(kind)
            if store is None:
                return 404, {"error": f"no route {path}"}
            if self.command == "GET" and ident is None:
                items = list(store.values())
                if kind == "templates" and query.get("includeEndpointBoundTemplates") != ["true"]:
                    bound = {e["templateId"] for e in state.endpoints.values()}
                    items = [t for t in items if t["id"] not in bound]
                return 200, items
            if self.command == "POST" and ident is None:
                if kind == "templates" and any(t["name"] == body.get("name") for t in store.values()):
                    return 400, {"error": f"Template name must be unique: {body.get('name')}"}
                if kind == "endpoints" and body.get("templateId") not in state.templates:
                    return 400, {"error": "templateId not found"}
                item = {**body, "id": state.new_id("tpl" if kind == "templates" else "ep")}
                if kind == "endpoints":
                    # Some RunPod surfaces (console, GraphQL era) show FlashBoot endpoints as
                    # "<name> -fb"; doing the same here exercises the suffix-tolerant lookup.
                    item["name"] = body["name"] + (" -fb" if body.get("flashboot") else "")
                store[item["id"]] = item
                return 200, item
            if self.command == "PATCH" and ident is not None:
                if ident not in store:
                    return 404, {"error": f"{kind[:-1]} {ident} not found"}
                store[ident].update(body)
                return 200, store[ident]
            return 405, {"error": "method not allowed"}

        do_GET = do_POST = do_PATCH = _handle  # noqa: N815 (http.server's naming)

    return Handler


@pytest.fixture
def runpod() -> Iterator[tuple[FakeRunPod, str]]:
    state = FakeRunPod()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WEBHOOK_SECRET", WEBHOOK_SECRET)


def _args(api_url: str, *extra: str) -> list[str]:
    return [
        "--name",
        "lora-worker",
        "--image",
        "docker.io/acme/lora-worker:0.1.0",
        "--network-volume-id",
        "vol-abc123",
        "--api-url",
        api_url,
        "--secret-env",
        "HF_TOKEN",
        "--secret-env",
        "WEBHOOK_SECRET",
        "--env",
        "PROGRESS_INTERVAL_S=10",
        *extra,
    ]


def _assert_no_secrets(text: str) -> None:
    for secret in (API_KEY, HF_TOKEN, WEBHOOK_SECRET):
        assert secret not in text


def test_first_deploy_creates_template_then_scale_to_zero_endpoint(runpod, capsys) -> None:
    state, url = runpod
    assert deploy.main(_args(url)) == 0
    out = capsys.readouterr()

    writes = state.writes()
    assert [(w.method, w.path) for w in writes] == [("POST", "/v1/templates"), ("POST", "/v1/endpoints")]
    assert all(r.headers["Authorization"] == f"Bearer {API_KEY}" for r in state.requests)

    tpl = writes[0].body
    assert tpl["name"] == "lora-worker-template"
    assert tpl["imageName"] == "docker.io/acme/lora-worker:0.1.0"
    assert tpl["isServerless"] is True
    assert tpl["volumeInGb"] == 0
    assert tpl["containerDiskInGb"] >= 20
    # Secrets travel to RunPod (that is the point) but are never printed.
    assert tpl["env"] == {"HF_TOKEN": HF_TOKEN, "WEBHOOK_SECRET": WEBHOOK_SECRET, "PROGRESS_INTERVAL_S": "10"}

    ep = writes[1].body
    template_id = next(iter(state.templates))
    assert ep["templateId"] == template_id
    assert ep["name"] == "lora-worker"
    assert ep["workersMin"] == 0
    assert ep["workersMax"] >= 1
    assert ep["idleTimeout"] == deploy.DEFAULT_IDLE_TIMEOUT_S
    assert ep["flashboot"] is True
    assert ep["networkVolumeId"] == "vol-abc123"
    assert ep["executionTimeoutMs"] >= DAY_MS
    assert ep["gpuCount"] == 1
    # Only hosts whose driver runs the image's CUDA: from the image's version up.
    assert ep["allowedCudaVersions"] == deploy.DEFAULT_CUDA_VERSIONS
    assert ep["allowedCudaVersions"][0] == deploy.IMAGE_CUDA and "13.0" in ep["allowedCudaVersions"]
    gpus = ep["gpuTypeIds"]
    assert gpus[0].startswith("NVIDIA H100")  # H100 first, ...
    assert any("A100" in g and "80" in g for g in gpus)  # ... A100 80 GB as fallback ...
    assert max(i for i, g in enumerate(gpus) if "H100" in g) < min(
        i for i, g in enumerate(gpus) if "A100" in g
    )

    endpoint_id = next(iter(state.endpoints))
    assert endpoint_id in out.out
    assert f"https://api.runpod.ai/v2/{endpoint_id}/run" in out.out
    _assert_no_secrets(out.out + out.err)


def test_second_deploy_patches_instead_of_duplicating(runpod, capsys) -> None:
    state, url = runpod
    assert deploy.main(_args(url)) == 0
    template_id, endpoint_id = next(iter(state.templates)), next(iter(state.endpoints))
    state.requests.clear()

    assert deploy.main(_args(url, "--idle-timeout", "30", "--workers-max", "3")) == 0
    out = capsys.readouterr()

    writes = state.writes()
    assert [(w.method, w.path) for w in writes] == [
        ("PATCH", f"/v1/templates/{template_id}"),
        ("PATCH", f"/v1/endpoints/{endpoint_id}"),
    ]
    # It asked for endpoint-bound templates; without that the bound template would be invisible.
    assert state.requests[0].query.get("includeEndpointBoundTemplates") == ["true"]
    assert len(state.templates) == 1 and len(state.endpoints) == 1
    ep = state.endpoints[endpoint_id]
    assert ep["idleTimeout"] == 30 and ep["workersMax"] == 3 and ep["workersMin"] == 0
    assert ep["templateId"] == template_id
    assert writes[0].body["env"]["HF_TOKEN"] == HF_TOKEN
    assert "updated endpoint" in out.out
    _assert_no_secrets(out.out + out.err)


def test_dry_run_sends_nothing_and_masks_secrets(runpod, capsys, monkeypatch) -> None:
    state, url = runpod
    monkeypatch.delenv("RUNPOD_API_KEY")  # a dry run needs no key
    assert deploy.main(_args(url, "--dry-run", "--env", "WANDB_API_KEY=wandb-plain-value")) == 0
    out = capsys.readouterr()

    assert state.requests == []
    _assert_no_secrets(out.out + out.err)
    assert "wandb-plain-value" not in out.out + out.err
    assert '"HF_TOKEN": "***"' in out.out
    assert '"WEBHOOK_SECRET": "***"' in out.out
    assert '"WANDB_API_KEY": "***"' in out.out
    assert '"PROGRESS_INTERVAL_S": "10"' in out.out  # not a secret: shown
    assert f"POST {url}/templates" in out.out and f"POST {url}/endpoints" in out.out
    assert "--secret-env WANDB_API_KEY" in out.err  # warned that --env put a secret on the command line


def test_runpod_secret_reference_is_shown_not_masked(runpod, capsys) -> None:
    _, url = runpod
    ref = "{{ RUNPOD_SECRET_hf_token }}"
    args = ["--name", "w", "--image", "img:1", "--api-url", url, "--env", f"HF_TOKEN={ref}", "--dry-run"]
    assert deploy.main(args) == 0
    out = capsys.readouterr()
    assert ref in out.out
    assert "puts a secret on the command line" not in out.err
    assert "no --network-volume-id" in out.err  # the dry run warns like the real run


def test_unauthorized_is_one_clear_line(runpod, capsys, monkeypatch) -> None:
    state, url = runpod
    monkeypatch.setenv("RUNPOD_API_KEY", "rpa_wrong_key")
    assert deploy.main(_args(url)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "HTTP 401" in err and "invalid or missing API key" in err
    assert "Traceback" not in err
    assert "rpa_wrong_key" not in err
    assert state.writes() == []


def test_bad_request_shows_the_api_message(runpod, capsys) -> None:
    state, url = runpod
    state.fail[("POST", "/v1/endpoints")] = (400, '{"error": "gpuTypeIds[0]: unknown GPU type"}')
    assert deploy.main(_args(url)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "HTTP 400" in err and "POST" in err and "gpuTypeIds[0]: unknown GPU type" in err
    _assert_no_secrets(err)


def test_server_error_with_text_body(runpod, capsys) -> None:
    state, url = runpod
    state.fail[("GET", "/v1/templates")] = (503, "upstream unavailable")
    assert deploy.main(_args(url)) == 1
    err = capsys.readouterr().err
    assert "HTTP 503" in err and "upstream unavailable" in err and err.count("\n") == 1


def test_api_error_echoing_a_secret_is_scrubbed(runpod, capsys) -> None:
    state, url = runpod
    state.fail[("POST", "/v1/templates")] = (400, json.dumps({"message": f"bad env value {HF_TOKEN}"}))
    assert deploy.main(_args(url)) == 1
    err = capsys.readouterr().err
    assert "bad env value <redacted>" in err
    _assert_no_secrets(err)


def test_connection_refused(capsys) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert deploy.main(_args(f"http://127.0.0.1:{port}/v1")) == 1
    err = capsys.readouterr().err
    assert "cannot reach the RunPod API" in err and "refused" in err.lower()
    assert err.count("\n") == 1


def test_missing_api_key_is_a_clear_error(runpod, capsys, monkeypatch) -> None:
    state, url = runpod
    monkeypatch.delenv("RUNPOD_API_KEY")
    assert deploy.main(_args(url)) == 1
    err = capsys.readouterr().err
    assert "RUNPOD_API_KEY" in err and "--dry-run" in err
    assert state.requests == []


def test_missing_secret_env_is_a_clear_error(runpod, capsys, monkeypatch) -> None:
    state, url = runpod
    monkeypatch.delenv("WEBHOOK_SECRET")
    assert deploy.main(_args(url)) == 1
    assert "WEBHOOK_SECRET is not set" in capsys.readouterr().err
    assert state.requests == []


def test_endpoint_found_by_template_id_when_template_was_renamed(runpod, capsys) -> None:
    """An endpoint whose template has another name: its own template is updated, nothing created."""
    state, url = runpod
    state.templates["tplX"] = {"id": "tplX", "name": "made-in-console", "imageName": "old:1"}
    state.endpoints["epX"] = {"id": "epX", "name": "lora-worker -fb", "templateId": "tplX"}
    assert deploy.main(_args(url)) == 0
    assert [(w.method, w.path) for w in state.writes()] == [
        ("PATCH", "/v1/templates/tplX"),
        ("PATCH", "/v1/endpoints/epX"),
    ]
    assert state.templates["tplX"]["imageName"] == "docker.io/acme/lora-worker:0.1.0"


def test_two_endpoints_with_the_name_is_an_error_not_a_guess(runpod, capsys) -> None:
    state, url = runpod
    state.templates["t1"] = {"id": "t1", "name": "lora-worker-template"}
    state.endpoints["e1"] = {"id": "e1", "name": "lora-worker", "templateId": "t1"}
    state.endpoints["e2"] = {"id": "e2", "name": "lora-worker -fb", "templateId": "t1"}
    assert deploy.main(_args(url)) == 1
    err = capsys.readouterr().err
    assert "2 endpoints" in err and "e1" in err and "e2" in err
    assert state.writes() == []


def test_options_are_validated_before_anything_is_sent(runpod, capsys) -> None:
    state, url = runpod
    assert deploy.main(_args(url, "--idle-timeout", "0")) == 1
    assert deploy.main(_args(url, "--env", "NOEQUALS")) == 1
    assert deploy.main(_args(url, "--execution-timeout-hours", "-1")) == 1
    assert state.requests == []
    assert deploy.main(["--name", "x"]) == 2  # argparse usage error: --image missing


def test_gpu_ids_accept_commas_and_custom_timeout(runpod) -> None:
    state, url = runpod
    extra = ("--gpu-ids", "NVIDIA H100 80GB HBM3,NVIDIA A100 80GB PCIe", "--execution-timeout-hours", "48")
    assert deploy.main(_args(url, *extra)) == 0
    ep = next(iter(state.endpoints.values()))
    assert ep["gpuTypeIds"] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100 80GB PCIe"]
    assert ep["executionTimeoutMs"] == 48 * 3600 * 1000


def test_cli_entry_point_end_to_end(runpod) -> None:
    """`python -m lora_worker deploy` in a child process: exit codes and output as a user sees them."""
    state, url = runpod
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "RUNPOD_API_KEY": API_KEY}
    cmd = [sys.executable, "-m", "lora_worker", "deploy", *_args(url)]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "created endpoint" in ok.stdout
    _assert_no_secrets(ok.stdout + ok.stderr)

    env["RUNPOD_API_KEY"] = "rpa_wrong"
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "HTTP 401" in bad.stderr and "Traceback" not in bad.stderr
    assert len(state.endpoints) == 1


def test_rejected_long_timeout_gets_a_hint(runpod, capsys) -> None:
    state, url = runpod
    state.fail[("POST", "/v1/endpoints")] = (400, '{"error": "executionTimeoutMs must be at most 86400000"}')
    assert deploy.main(_args(url)) == 1
    err = capsys.readouterr().err
    assert "executionTimeoutMs must be at most 86400000" in err
    assert "--execution-timeout-hours 24" in err and err.count("\n") == 1


def test_gpu_count_is_sent_and_validated(runpod, capsys) -> None:
    state, url = runpod
    assert deploy.main(_args(url, "--gpu-count", "0")) == 1
    assert "--gpu-count must be 1-8, got 0" in capsys.readouterr().err
    assert state.requests == []
    assert deploy.main(_args(url, "--gpu-count", "2")) == 0
    assert next(iter(state.endpoints.values()))["gpuCount"] == 2


def test_cuda_versions_below_the_image_warn_and_unknown_ones_are_refused(runpod, capsys) -> None:
    state, url = runpod
    assert deploy.main(_args(url, "--allowed-cuda-versions", "11.8")) == 1
    err = capsys.readouterr().err
    assert "--allowed-cuda-versions 11.8: RunPod takes one of" in err and state.requests == []
    assert deploy.main(_args(url, "--allowed-cuda-versions", "12.4,12.8")) == 0
    err = capsys.readouterr().err
    assert f"the image is built for CUDA {deploy.IMAGE_CUDA}; on hosts with CUDA 12.4" in err
    assert next(iter(state.endpoints.values()))["allowedCudaVersions"] == ["12.4", "12.8"]


def test_cuda_versions_from_the_image_version_up() -> None:
    assert deploy.cuda_versions_from("12.6") == ["12.6", "12.7", "12.8", "12.9", "13.0"]
    assert deploy.cuda_versions_from("13.0") == ["13.0"]
    assert deploy.cuda_versions_from("12.10") == ["13.0"]  # compared as numbers, not as text
