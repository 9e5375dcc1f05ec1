"""Secrets out of every log line the process writes, whichever library writes it.

Libraries log URLs in full at debug level (urllib3 logs `PUT /key?X-Amz-Signature=...`), and a
handler-level filter only covers the handlers it is attached to. A log-record factory runs for
every record any logger creates, so each message is scrubbed once, at the source: the worker's
secrets are replaced and every URL query string is cut (presigned URLs carry their signature there).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from lora_worker.runtime.net import scrub

_secrets: set[str] = set()
_lock = threading.Lock()
_installed = False


def install(secrets: Iterable[str | None] = ()) -> None:
    """Scrub these secrets (and any URL query) from every later log record; safe to call again."""
    global _installed
    with _lock:
        _secrets.update(s for s in secrets if s)
        if _installed:
            return
        base = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = base(*args, **kwargs)
            try:
                text = record.getMessage()
            except Exception:  # a malformed record stays as it is; logging reports it itself
                return record
            clean = scrub(text, *_secrets)
            if clean != text:
                record.msg, record.args = clean, None
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
