"""Archive, presigned upload and Hub push against real loopback servers: moto's S3 server, a scripted
HTTP server for faults S3 stand-ins cannot produce, and a minimal Hugging Face Hub stand-in."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from lora_worker.runtime.delivery.archive import archive_dir
from lora_worker.runtime.delivery.upload import upload_presigned, upload_to_hf_hub
from lora_worker.runtime.files import sha256_file
from lora_worker.runtime.net import redact_url

BUCKET = "adapters"
DENIED_PREFIX = "denied/"
HF_TOKEN = "hf_TESTTOKEN_do_not_leak_123"

# --------------------------------------------------------------------------------------------
# Fixtures


def make_tree(root: Path) -> dict[str, Path]:
    adapter = root / "adapter"
    (adapter / "nested").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(64 * 1024))
    (adapter / "nested" / "z.txt").write_text("z")
    report = root / "report"
    report.mkdir()
    (report / "report.md").write_text("# report\n")
    (report / "report.json").write_text("{}")
    return {"report": report, "adapter": adapter}


@pytest.fixture
def archive(tmp_path: Path) -> dict:
    return archive_dir(make_tree(tmp_path / "src"), tmp_path / "out" / "job.tar.gz")


@pytest.fixture(scope="module")
def s3() -> Iterator:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket=BUCKET)
    # A real S3 refusal: moto enforces bucket policies on PUT (it does not check presigned
    # signatures or expiry, see the scripted-server test for an expired URL's response).
    deny = {
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:PutObject",
        "Resource": f"arn:aws:s3:::{BUCKET}/{DENIED_PREFIX}*",
    }
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [deny]}))
    yield client
    server.stop()


def presign(client, key: str, bucket: str = BUCKET) -> str:
    return client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": key, "ContentType": "application/gzip"}, ExpiresIn=600
    )


class Scripted(BaseHTTPRequestHandler):
    """Answers PUTs from the server's `script`: a list of (status, headers) consumed in order,
    the last one repeating. Records each request's headers and body."""

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        srv = self.server
        srv.requests.append({"headers": dict(self.headers), "body": body, "path": self.path})  # type: ignore[attr-defined]
        srv.on_request()  # type: ignore[attr-defined]
        script = srv.script  # type: ignore[attr-defined]
        status, headers, payload = script.pop(0) if len(script) > 1 else script[0]
        headers = {k: (v.replace("{md5}", hashlib.md5(body).hexdigest())) for k, v in headers.items()}
        data = payload.encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def scripted() -> Iterator:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.requests = []  # type: ignore[attr-defined]
    server.script = [(200, {}, "")]  # type: ignore[attr-defined]
    server.on_request = lambda: None  # type: ignore[attr-defined]  # a fault to inject mid-request
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url_of(server, query: str = "X-Amz-Signature=SIGSECRET&X-Amz-Credential=CREDSECRET") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/bucket/job.tar.gz?{query}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


# --------------------------------------------------------------------------------------------
# Archive


def test_archive_members_hash_and_reproducibility(tmp_path: Path, archive: dict) -> None:
    path = Path(archive["path"])
    assert path == tmp_path / "out" / "job.tar.gz"
    assert archive["size_bytes"] == path.stat().st_size
    assert archive["sha256"] == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["job.tar.gz"]  # temp file renamed away

    with tarfile.open(path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "adapter",
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "adapter/nested",
            "adapter/nested/z.txt",
            "report",
            "report/report.json",
            "report/report.md",
        ]
        assert {m.mtime for m in members} == {0} and {m.uid for m in members} == {0}
        src = tmp_path / "src"
        data = tar.extractfile("adapter/adapter_model.safetensors").read()  # type: ignore[union-attr]
        assert data == (src / "adapter" / "adapter_model.safetensors").read_bytes()

    # Same content, later mtimes, a new destination: same bytes.
    for file in (tmp_path / "src").rglob("*"):
        os.utime(file, (time.time() + 1000, time.time() + 1000))
    again = archive_dir(
        {"adapter": src / "adapter", "report": src / "report"}, tmp_path / "elsewhere" / "other.tar.gz"
    )
    assert again["sha256"] == archive["sha256"]


def test_archive_rejects_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        archive_dir({"adapter": tmp_path / "missing"}, tmp_path / "a.tar.gz")
    with pytest.raises(ValueError):
        archive_dir({"../escape": tmp_path}, tmp_path / "a.tar.gz")
    assert not (tmp_path / "a.tar.gz").exists()


# --------------------------------------------------------------------------------------------
# Presigned upload to moto's S3 server


def test_upload_to_s3_presigned_url_round_trips(s3, archive: dict) -> None:
    url = presign(s3, "jobs/job-1/job.tar.gz")
    messages: list[str] = []
    result = upload_presigned(Path(archive["path"]), url, sha256=archive["sha256"], log=messages.append)

    assert result["ok"] is True, result
    assert result["attempts"] == 1 and result["status"] == 200 and result["error"] is None
    assert result["etag_verified"] is True  # single-part PUT: ETag is the body's MD5
    assert result["sha256"] == archive["sha256"]
    assert result["url"] == url.split("?")[0]
    assert "X-Amz-Signature" not in json.dumps(result) + "".join(messages)

    obj = s3.get_object(Bucket=BUCKET, Key="jobs/job-1/job.tar.gz")
    assert obj["ContentType"] == "application/gzip"
    assert hashlib.sha256(obj["Body"].read()).hexdigest() == archive["sha256"]


def test_forbidden_presigned_url_is_not_retried(s3, archive: dict) -> None:
    sleeps = Sleeps()
    url = presign(s3, DENIED_PREFIX + "job.tar.gz")
    result = upload_presigned(Path(archive["path"]), url, sha256=archive["sha256"], sleep=sleeps)

    assert result["ok"] is False
    assert result["attempts"] == 1 and result["status"] == 403 and sleeps == []
    assert "HTTP 403" in result["error"] and "expired" in result["error"] and "not retried" in result["error"]


def test_missing_bucket_reports_the_store_error(s3, archive: dict) -> None:
    url = presign(s3, "job.tar.gz", bucket="no-such-bucket")
    result = upload_presigned(Path(archive["path"]), url, sha256=archive["sha256"], sleep=Sleeps())
    assert result["ok"] is False and result["attempts"] == 1 and result["status"] == 404
    assert "NoSuchBucket" in result["error"]


# --------------------------------------------------------------------------------------------
# Presigned upload against a scripted server (faults moto does not produce)


def test_expired_url_gives_clear_error_without_retry(scripted, archive: dict) -> None:
    # The body real S3 sends for an expired presigned URL.
    expired = (
        "<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    )
    scripted.script = [(403, {"Content-Type": "application/xml"}, expired)]
    sleeps = Sleeps()
    result = upload_presigned(Path(archive["path"]), url_of(scripted), sha256=archive["sha256"], sleep=sleeps)

    assert result["ok"] is False and result["attempts"] == 1 and sleeps == []
    assert "AccessDenied: Request has expired" in result["error"]
    assert len(scripted.requests) == 1


def test_flaky_store_succeeds_on_third_attempt_resending_the_whole_file(scripted, archive: dict) -> None:
    scripted.script = [(503, {}, "busy"), (503, {}, "busy"), (200, {"ETag": '"{md5}"'}, "")]
    sleeps = Sleeps()
    messages: list[str] = []
    result = upload_presigned(
        Path(archive["path"]),
        url_of(scripted),
        sha256=archive["sha256"],
        backoff_s=0.5,
        sleep=sleeps,
        log=messages.append,
    )

    assert result["ok"] is True, result
    assert result["attempts"] == 3 and result["status"] == 200 and result["etag_verified"] is True
    assert sleeps == [0.5, 1.0]  # exponential backoff
    payload = Path(archive["path"]).read_bytes()
    assert [r["body"] for r in scripted.requests] == [payload] * 3
    headers = scripted.requests[-1]["headers"]
    assert headers["Content-Type"] == "application/gzip"
    assert headers["Content-Length"] == str(len(payload))
    assert "Transfer-Encoding" not in headers
    text = json.dumps(result) + "\n".join(messages)
    assert "SIGSECRET" not in text and "CREDSECRET" not in text


def test_throttling_honours_retry_after(scripted, archive: dict) -> None:
    scripted.script = [(429, {"Retry-After": "7"}, ""), (200, {}, "")]
    sleeps = Sleeps()
    result = upload_presigned(Path(archive["path"]), url_of(scripted), sha256=archive["sha256"], sleep=sleeps)
    assert result["ok"] is True and result["attempts"] == 2 and sleeps == [7.0]
    assert result["etag_verified"] is None  # no ETag to check


def test_etag_mismatch_is_a_failed_attempt(scripted, archive: dict) -> None:
    scripted.script = [(200, {"ETag": '"' + "0" * 32 + '"'}, "")]
    result = upload_presigned(
        Path(archive["path"]), url_of(scripted), sha256=archive["sha256"], attempts=2, sleep=Sleeps()
    )
    assert result["ok"] is False and result["attempts"] == 2 and result["etag_verified"] is False
    assert "MD5" in result["error"]


def test_multipart_style_etag_is_not_compared(scripted, archive: dict) -> None:
    scripted.script = [(200, {"ETag": '"' + "a" * 32 + '-3"'}, "")]
    result = upload_presigned(
        Path(archive["path"]), url_of(scripted), sha256=archive["sha256"], sleep=Sleeps()
    )
    assert result["ok"] is True and result["etag_verified"] is None


def test_closed_port_fails_after_all_attempts_quickly_without_leaking_the_signature(archive: dict) -> None:
    url = f"http://127.0.0.1:{closed_port()}/bucket/job.tar.gz?X-Amz-Signature=SIGSECRET&token=TOKSECRET"
    sleeps = Sleeps()
    messages: list[str] = []
    started = time.monotonic()
    result = upload_presigned(
        Path(archive["path"]), url, sha256=archive["sha256"], attempts=4, sleep=sleeps, log=messages.append
    )

    assert time.monotonic() - started < 5
    assert result["ok"] is False and result["attempts"] == 4 and result["status"] is None
    assert sleeps == [2.0, 4.0, 8.0]
    assert result["error"].startswith("ConnectionError")
    assert result["url"] == redact_url(url) == url.split("?")[0]
    text = json.dumps(result) + "\n".join(messages)
    assert "SIGSECRET" not in text and "TOKSECRET" not in text


def test_archive_deleted_during_the_upload_stops_without_retrying(scripted, archive: dict) -> None:
    # The store has the body and answers with an MD5 ETag; checking it needs the archive, now gone.
    path = Path(archive["path"])
    scripted.on_request = path.unlink
    scripted.script = [(200, {"ETag": '"{md5}"'}, "")]
    sleeps = Sleeps()
    result = upload_presigned(path, url_of(scripted), sha256=archive["sha256"], sleep=sleeps)

    assert result["ok"] is False and result["attempts"] == 1 and sleeps == []
    assert result["status"] == 200 and result["etag_verified"] is None
    assert result["error"].startswith(f"cannot read archive {path}")
    assert len(scripted.requests) == 1


def test_missing_file_is_reported_not_raised(tmp_path: Path) -> None:
    result = upload_presigned(tmp_path / "nope.tar.gz", "http://127.0.0.1:9/x?sig=1", sha256="0" * 64)
    assert result["ok"] is False and result["attempts"] == 0 and "cannot read archive" in result["error"]


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


class HubStandIn(BaseHTTPRequestHandler):
    """The three Hub API calls `create_repo` + `upload_folder` make for small files: create the repo,
    ask how to upload each file (we say "regular": inline in the commit), and commit."""

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # anything else the client probes for: not found
        self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv = self.server
        srv.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        if self.path == "/api/repos/create":
            req = json.loads(body)
            self._reply(200, {"url": f"{base}/{req['organization']}/{req['name']}"})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        elif "/commit/" in self.path:
            self._reply(200, {"commitUrl": f"{base}/studio/adapter/commit/{'c' * 40}", "commitOid": "c" * 40})
        else:
            self._reply(404, {"error": "not found"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadingHTTPServer]:
    import huggingface_hub.constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    server.calls = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    # huggingface_hub also fetches an "agent harnesses" list from its default endpoint to build its
    # User-Agent; point that at loopback too so the test never tries the internet.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.shutdown()
    server.server_close()


def test_hub_upload_succeeds_against_stand_in(tmp_path: Path, hub_endpoint, caplog) -> None:
    folder = make_tree(tmp_path)["adapter"]
    endpoint = f"http://127.0.0.1:{hub_endpoint.server_address[1]}"
    with caplog.at_level(logging.DEBUG):
        result = upload_to_hf_hub(
            folder, "studio/adapter", token=HF_TOKEN, endpoint=endpoint, commit_message="job-1"
        )

    assert result == {
        "ok": True,
        "repo_id": "studio/adapter",
        "url": f"{endpoint}/studio/adapter",
        "commit": "c" * 40,
        "error": None,
    }
    create, *_, commit = hub_endpoint.calls
    assert json.loads(create["body"])["visibility"] == "private"
    assert create["auth"] == f"Bearer {HF_TOKEN}"
    lines = [json.loads(line) for line in commit["body"].decode().splitlines()]
    assert lines[0]["value"]["summary"] == "job-1"
    uploaded = {
        ln["value"]["path"]: base64.b64decode(ln["value"]["content"]) for ln in lines if ln["key"] == "file"
    }
    assert uploaded["adapter_config.json"] == b'{"r": 16}'
    assert uploaded["nested/z.txt"] == b"z"
    assert uploaded["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    assert HF_TOKEN not in caplog.text


def test_hub_upload_failure_is_reported_without_the_token(
    tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    folder = make_tree(tmp_path)["adapter"]
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        result = upload_to_hf_hub(
            folder, "studio/adapter", token=HF_TOKEN, endpoint=endpoint, commit_message="m"
        )

    assert time.monotonic() - started < 10
    assert result["ok"] is False and result["commit"] is None and result["url"] is None
    assert result["repo_id"] == "studio/adapter"
    assert "Connect" in result["error"] or "refused" in result["error"]
    assert HF_TOKEN not in json.dumps(result)
    assert HF_TOKEN not in caplog.text
    assert "Hub upload of studio/adapter failed" in caplog.text


def test_hub_upload_without_token_or_folder(tmp_path: Path) -> None:
    no_token = upload_to_hf_hub(tmp_path, "studio/adapter", token="", commit_message="m")
    assert no_token["ok"] is False and "HF_TOKEN" in no_token["error"]
    no_folder = upload_to_hf_hub(tmp_path / "missing", "studio/adapter", token=HF_TOKEN, commit_message="m")
    assert no_folder["ok"] is False and "not a directory" in no_folder["error"]
