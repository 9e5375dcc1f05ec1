"""No secret or URL signature reaches a log line, whichever library logs it."""

from __future__ import annotations

import logging

import requests
from conftest import LoopbackServer

from lora_worker.runtime import redaction


def test_a_library_debug_line_with_a_presigned_url_is_scrubbed(caplog):
    redaction.install(["hf_secret_token_123"])
    server = LoopbackServer()
    try:
        with caplog.at_level(logging.DEBUG):
            requests.put(f"{server.base}/bucket/key.tar.gz?X-Amz-Signature=deadbeef", data=b"x", timeout=5)
            logging.getLogger("somewhere").info("token is %s", "hf_secret_token_123")
    finally:
        server.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/bucket/key.tar.gz" in text  # urllib3 logged the request ...
    assert "deadbeef" not in text and "hf_secret_token_123" not in text  # ... without its signature
