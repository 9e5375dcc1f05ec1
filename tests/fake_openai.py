"""A loopback stand-in for an OpenAI-compatible chat endpoint, answering scripted judge verdicts.

    with FakeOpenAI(script) as server:
        settings = JudgeSettings(base_url=server.base, api_key="sk-test", model="fake-judge")

`script(request) -> answer` gets the parsed JSON body of each `POST /v1/chat/completions` and
returns the assistant's text, or `(status, body)` for an HTTP error (`body` a str or a dict;
`headers` may be given as a third item). Every request is kept as (path, headers, body) in
`requests`, headers lower-cased. The server is real HTTP on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = str | tuple[int, Any] | tuple[int, Any, dict[str, str]]


def replies_of(request: dict) -> tuple[str, str]:
    """(Reply A, Reply B) as the judge prompt showed them."""
    text = request["messages"][-1]["content"]
    a = re.search(r"<reply_a>\n(.*?)\n</reply_a>", text, re.S)
    b = re.search(r"<reply_b>\n(.*?)\n</reply_b>", text, re.S)
    return (a.group(1) if a else ""), (b.group(1) if b else "")


def completion(text: str, model: str = "fake-judge") -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


class FakeOpenAI:
    def __init__(self, script: Callable[[dict], Answer]):
        self.requests: list[tuple[str, dict[str, str], dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = json.loads(raw or b"{}")
                outer.requests.append((self.path, headers, body))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                answer = script(body)
                if isinstance(answer, str):
                    return self._send(200, completion(answer, body.get("model", "")), {})
                status, payload, *extra = answer
                return self._send(status, payload, extra[0] if extra else {})

            def _send(self, status: int, payload: Any, headers: dict[str, str]):
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
