"""The dataset file, fetched from a real loopback HTTP server that redirects, trickles, lies about
its size or breaks off, and from paths that are not dataset files; no partial file is ever left."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import SAMPLE, tmpfs

from lora_worker.runtime.data import (
    DatasetError,
    DatasetFetchError,
    PreprocessingCancelled,
    fetch_dataset,
    load_dataset,
)

BODY = SAMPLE.read_bytes()


class ScriptedServer:
    """HTTP on 127.0.0.1: each path is a behaviour (see `_serve`); `stop` ends slow responses."""

    def __init__(self):
        self.stop = threading.Event()
        self.sent: dict[str, int] = {}  # path -> body bytes written
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                try:
                    outer._serve(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up, as it should on a refused download

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _headers(self, h, status: int, **headers) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), str(v))
        h.end_headers()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?")[0]
        if path == "/data.json":
            self._headers(h, 200, Content_Length=len(BODY))
            h.wfile.write(BODY)
        elif path == "/hop":
            self._headers(h, 302, Location="/data.json", Content_Length=0)
        elif path == "/to-refused":
            self._headers(h, 302, Location="http://example.invalid/data.json", Content_Length=0)
        elif path == "/loop":
            self._headers(h, 301, Location="/loop", Content_Length=0)
        elif path == "/trickle":  # one byte every 200 ms: each read is quick, the whole never ends
            self._headers(h, 200, Content_Length=10_000)
            for i in range(10_000):
                if self.stop.wait(0.2):
                    return
                h.wfile.write(b"{" if i == 0 else b" ")
                h.wfile.flush()
                self.sent[path] = i + 1
        elif path == "/huge":  # declares 10 GB, then sends nothing until the test ends
            self._headers(h, 200, Content_Length=10 * 1000**3)
            self.stop.wait(30)
        elif path == "/short":  # declares the whole file, sends a tenth of it, hangs up
            self._headers(h, 200, Content_Length=len(BODY))
            h.wfile.write(BODY[: len(BODY) // 10])
            h.close_connection = True
        elif path == "/chunked":  # no declared size: the size cap applies as the bytes arrive
            self._headers(h, 200, Transfer_Encoding="chunked")
            for _ in range(64):
                h.wfile.write(b"%x\r\n%s\r\n" % (4096, b" " * 4096))
            h.wfile.write(b"0\r\n\r\n")
        else:
            self._headers(h, 404, Content_Length=0)

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_with_a_redirect_hop_returns_the_file_and_its_checksum(server, tmp_path):
    got = fetch_dataset(url=f"{server.url}/hop?X-Amz-Signature=s3cr3t", dest_dir=tmp_path / "dl")
    assert got.path.read_bytes() == BODY and got.size_bytes == len(BODY)
    assert got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert "s3cr3t" not in got.source and got.path.name == "hop"
    assert leftovers(tmp_path / "dl") == ["hop"]  # no temporary file beside it
    assert load_dataset(got.path).stats.conversations == 24


def test_redirect_to_a_refused_url_is_refused(server, tmp_path):
    with pytest.raises(DatasetFetchError) as err:
        fetch_dataset(url=f"{server.url}/to-refused", dest_dir=tmp_path / "dl")
    assert str(err.value).startswith("dataset_url: redirect to http://example.invalid/data.json refused")
    assert isinstance(err.value, DatasetError)
    assert leftovers(tmp_path / "dl") == []
    with pytest.raises(DatasetFetchError, match="more than 5 redirects"):
        fetch_dataset(url=f"{server.url}/loop", dest_dir=tmp_path / "dl")


def test_trickling_server_is_cut_off_at_the_deadline(server, tmp_path):
    with pytest.raises(DatasetFetchError, match="longer than the 2 s deadline"):
        fetch_dataset(url=f"{server.url}/trickle", dest_dir=tmp_path / "dl", deadline_s=2)
    assert server.sent.get("/trickle", 0) < 10_000  # cut off long before the server finished
    assert leftovers(tmp_path / "dl") == []


def test_deadline_uses_the_injected_clock(server, tmp_path):
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # every look at the clock costs a second
        return now[0]

    with pytest.raises(DatasetFetchError, match="deadline"):
        fetch_dataset(url=f"{server.url}/data.json", dest_dir=tmp_path / "dl", deadline_s=3, clock=clock)
    assert leftovers(tmp_path / "dl") == []


def test_declared_size_over_the_cap_is_refused_before_the_body(server, tmp_path):
    # The server sends no body at all: reading it would wait for the deadline, not fail on size.
    with pytest.raises(DatasetFetchError, match="declares 10,000.0 MB, more than the limit of 1,073.7 MB"):
        fetch_dataset(url=f"{server.url}/huge", dest_dir=tmp_path / "dl", deadline_s=60)
    assert leftovers(tmp_path / "dl") == []


def test_undeclared_size_over_the_cap_is_cut_off(server, tmp_path):
    with pytest.raises(DatasetFetchError, match="larger than the limit"):
        fetch_dataset(url=f"{server.url}/chunked", dest_dir=tmp_path / "dl", max_bytes=100_000)
    assert leftovers(tmp_path / "dl") == []


def test_broken_off_download_leaves_no_partial_file(server, tmp_path):
    with pytest.raises(DatasetFetchError, match="download failed"):
        fetch_dataset(url=f"{server.url}/short", dest_dir=tmp_path / "dl")
    assert leftovers(tmp_path / "dl") == []


def test_http_error_names_the_url_without_its_query(server, tmp_path):
    with pytest.raises(DatasetFetchError) as err:
        fetch_dataset(url=f"{server.url}/missing.json?token=s3cr3t", dest_dir=tmp_path / "dl")
    assert str(err.value) == f"dataset_url: HTTP 404 from {server.url}/missing.json"
    with pytest.raises(DatasetFetchError, match="dataset_url: must be an https:// URL"):
        fetch_dataset(url="http://example.com/data.json", dest_dir=tmp_path / "dl")


def test_cancel_stops_a_download(server, tmp_path):
    with pytest.raises(PreprocessingCancelled, match="downloading cancelled after 0 of 10000 bytes"):
        fetch_dataset(url=f"{server.url}/trickle", dest_dir=tmp_path / "dl", should_stop=lambda: True)
    assert leftovers(tmp_path / "dl") == []


@pytest.fixture
def tiny_volume(tmp_path):
    """A real 1 MiB filesystem (tmpfs), where the platform lets the test mount one."""
    with tmpfs(tmp_path / "vol", "1m") as mnt:
        yield mnt


def test_full_volume_refuses_a_declared_size_and_cleans_up_an_undeclared_one(server, tiny_volume):
    dest = tiny_volume / "dl"
    (tiny_volume / "filler").write_bytes(b"x" * 400_000)  # about 640 KB left; the file is 779 KB
    with pytest.raises(DatasetFetchError, match="not enough free space for the dataset download"):
        fetch_dataset(url=f"{server.url}/data.json", dest_dir=dest)
    assert leftovers(dest) == []
    (tiny_volume / "filler").write_bytes(b"x" * 900_000)  # about 140 KB left; 256 KB arrive undeclared
    with pytest.raises(DatasetFetchError, match="cannot write the download: No space left on device"):
        fetch_dataset(url=f"{server.url}/chunked", dest_dir=dest)
    assert leftovers(dest) == []


# ----------------------------------------------------------------------------- dataset_path


def test_dataset_path_checks(tmp_path):
    got = fetch_dataset(path=SAMPLE, dest_dir=tmp_path)
    assert (
        got.path == SAMPLE and got.sha256 == hashlib.sha256(BODY).hexdigest() and got.size_bytes == len(BODY)
    )
    (tmp_path / "vol" / "data").mkdir(parents=True)
    (tmp_path / "vol" / "data" / "d.json").write_bytes(BODY)
    rel = fetch_dataset(path="data/d.json", dest_dir=tmp_path, volume_dir=tmp_path / "vol")
    assert rel.path == tmp_path / "vol" / "data" / "d.json"
    with pytest.raises(DatasetFetchError, match="dataset_path: no such file: nowhere.json"):
        fetch_dataset(path="nowhere.json", dest_dir=tmp_path)
    with pytest.raises(DatasetFetchError, match="is a directory"):
        fetch_dataset(path=tmp_path, dest_dir=tmp_path)
    with pytest.raises(DatasetFetchError, match="not a regular file"):
        fetch_dataset(path="/dev/null", dest_dir=tmp_path)
    with pytest.raises(DatasetFetchError, match="more than the limit of 10 bytes"):
        fetch_dataset(path=SAMPLE, dest_dir=tmp_path, max_bytes=10)
    with pytest.raises(DatasetFetchError, match="exactly one"):
        fetch_dataset(dest_dir=tmp_path)
