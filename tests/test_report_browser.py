"""report.html in a real headless Chromium (Debian's `chromium` package), driven over the DevTools
protocol: the page shows its sections, every image decodes, no script element exists, model text
containing markup shows as text, and the page makes no request beyond its own file and data: URIs.

The DevTools client is the `websockets` package's synchronous client (a maintained library; the
protocol is a few JSON messages over one WebSocket, so no browser-automation framework, and no
browser download, is needed). Skipped when Chromium is absent, except in CI (env CI set), where the
package must be installed and a missing browser fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import SAMPLE
from report_builders import SCRIPT, make_report

from lora_worker.runtime.data import prepare_dataset
from lora_worker.runtime.delivery.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]
START_TIMEOUT_S = 90.0  # a cold Chromium on a busy 2-core machine
CALL_TIMEOUT_S = 60.0

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(
            f"CI: Chromium is required for the report browser test (apt-get install chromium); not at {CHROMIUM}"
        )
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
if os.environ.get("CI"):
    from websockets.sync.client import connect
else:
    connect = pytest.importorskip("websockets.sync.client").connect


class DevTools:
    """One page of a headless Chromium started for the test, spoken to over the DevTools protocol."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its renderer and helper processes share this group
        )
        port = self._port(profile / "DevToolsActivePort")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=CALL_TIMEOUT_S) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=CALL_TIMEOUT_S)
        self.next_id = 0
        self.events: list[dict] = []

    def _port(self, marker: Path) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:  # poll for readiness: Chromium writes the port when it listens
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self.proc.returncode}")
            text = marker.read_text() if marker.exists() else ""
            if text.strip():
                return int(text.split()[0])
            time.sleep(0.05)
        raise TimeoutError(f"chromium did not open its DevTools port within {START_TIMEOUT_S:g} s")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=CALL_TIMEOUT_S))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, event: str) -> dict:
        for i, msg in enumerate(self.events):
            if msg.get("method") == event:
                return self.events.pop(i)
        while True:
            msg = json.loads(self.ws.recv(timeout=CALL_TIMEOUT_S))
            if msg.get("method") == event:
                return msg
            self.events.append(msg)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this test started, by its id
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


PAGE_FACTS = """JSON.stringify({
  sections: [...document.querySelectorAll('main > section')].map(s => s.id),
  headings: [...document.querySelectorAll('main h2')].map(h => h.textContent),
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                          shown: i.getBoundingClientRect().width})),
  scripts: document.scripts.length,
  text: document.body.innerText,
  title: document.title,
})"""


@pytest.fixture(scope="module")
def report_page(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("browser")
    dataset = prepare_dataset(
        SAMPLE, tokenizer, max_seq_length=512, eval_fraction=0.25, max_eval=6
    ).summary.as_dict()
    return write_report(out / "report", make_report(dataset))["html"]


def test_report_renders_in_headless_chromium(report_page: Path, tmp_path: Path) -> None:
    browser = DevTools(tmp_path / "profile")
    try:
        browser.call("Network.enable")
        browser.call("Page.enable")
        browser.call("Page.navigate", url=report_page.as_uri())
        browser.wait_for("Page.loadEventFired")
        facts = json.loads(
            browser.call("Runtime.evaluate", expression=PAGE_FACTS, returnByValue=True)["result"]["value"]
        )
        requests = [
            e["params"]["request"]["url"]
            for e in browser.events
            if e.get("method") == "Network.requestWillBeSent"
        ]
    finally:
        browser.close()
    assert facts["title"] == "Fine-tuning report: job-42"
    assert facts["sections"][:3] == ["summary", "results", "judge"]
    for section in (
        "slices",
        "scenarios",
        "forgetting",
        "end_of_turn",
        "samples",
        "dataset",
        "cost",
        "adapter",
    ):
        assert section in facts["sections"]
    assert "Judged comparison" in facts["headings"] and "Held-out loss by slice" in facts["headings"]
    assert len(facts["images"]) == 3
    for image in facts["images"]:  # every plot decoded and laid out
        assert image["complete"] and image["width"] > 0 and image["shown"] > 0, image
    assert facts["scripts"] == 0
    assert SCRIPT in facts["text"]  # a reply's markup shows as the reply's text
    assert "Held-out loss fell from 1.8765 to 1.2345" in facts["text"]
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
