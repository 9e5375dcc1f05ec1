"""A real HTTP stand-in for the Hugging Face Hub on 127.0.0.1, for tests.

It implements the part of the Hub API huggingface_hub 2.4 uses here: `model_info`
(`GET /api/models/{id}[/revision/{rev}]`) and file resolution (`HEAD`/`GET /{id}/resolve/{rev}/{file}`
with `X-Repo-Commit`, `ETag`, `Content-Length` and, for LFS files, `X-Linked-Etag`/`X-Linked-Size`).
It never advertises Xet, so downloads use plain HTTP. Every request is recorded, which is how the
tests prove what was (not) fetched; `fail[filename] = status` makes a file answer with that error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

MODEL = "test-org/tiny-llama"
SHA = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth")
# Served by the stand-in but outside the allow-list (or inside the ignore-list): must never be requested.
NEVER_FETCHED = ("original/consolidated.00.pth", "pytorch_model.bin", "README.md")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    sha: str
    gated: bool = False
    accepted_tokens: tuple[str, ...] = ()


class FakeHub:
    """A threaded HTTP server answering like huggingface.co for the repos it holds."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, decoded path)
        # filename -> hook(handler, body) that writes the GET body itself (to slow down or stall it)
        self.body_hooks: dict[str, Callable[[BaseHTTPRequestHandler, bytes], None]] = {}
        self.fail: dict[str, int] = {}  # filename -> HTTP status it answers with (HEAD and GET)
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, files: dict[str, bytes], *, sha: str = SHA, **kw: object) -> FakeRepo:
        self.repos[repo_id] = FakeRepo(files=files, sha=sha, **kw)  # type: ignore[arg-type]
        return self.repos[repo_id]

    def file_requests(self, method: str | None = None) -> list[str]:
        """Filenames requested through /resolve/ (optionally only for one HTTP method)."""
        out = []
        with self._lock:
            for m, path in self.requests:
                found = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", path)
                if found and (method is None or m == method):
                    out.append(found[1])
        return out

    def gets(self, filename: str) -> int:
        return self.file_requests("GET").count(filename)

    def weight_requests(self) -> list[str]:
        """Every /resolve/ request (HEAD or GET) for a weight file."""
        return [n for n in self.file_requests() if n.endswith(LFS_SUFFIXES) or n.endswith(".index.json")]

    # -- request handling ------------------------------------------------------------------------

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, head: bool
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        self._send(h, status, headers, body, head)

    def _handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append((h.command, path))
        if m := re.match(r"^/api/models/([^/]+/[^/]+?)(?:/revision/(.+))?$", path):
            return self._model_info(h, m[1], m[2], head)
        if m := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
            return self._resolve(h, m[1], m[2], m[3], head)
        return self._error(h, 404, "EntryNotFound", "no such route", head)

    def _model_info(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str | None, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        if rev not in (None, "main", repo.sha):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
        siblings = []
        for name, data in sorted(repo.files.items()):
            entry: dict[str, object] = {"rfilename": name, "size": len(data)}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "pointerSize": 134,
                }
            siblings.append(entry)
        info = {"id": repo_id, "sha": repo.sha, "private": False, "gated": "manual" if repo.gated else False}
        info["siblings"] = siblings
        self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)

    def _resolve(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, filename: str, head: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        if repo.gated:
            auth = h.headers.get("Authorization")
            if auth is None or auth.removeprefix("Bearer ") not in repo.accepted_tokens:
                status = 401 if auth is None else 403
                msg = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
                return self._error(h, status, "GatedRepo", msg, head)
        if rev not in ("main", repo.sha):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
        if filename in self.fail:
            return self._error(h, self.fail[filename], "ServerError", f"{filename}: injected failure", head)
        data = repo.files.get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", f"{filename} does not exist", head)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',  # git blob id stand-in
        }
        if filename.endswith(LFS_SUFFIXES):  # LFS files: the Hub reports the LFS object's sha256 and size
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        hook = None if head else self.body_hooks.get(filename)
        if hook is None:
            return self._send(h, 200, headers, data, head)
        h.send_response(200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        with contextlib.suppress(OSError):  # the client may be gone (killed worker)
            hook(h, data)
