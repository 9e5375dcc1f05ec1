"""The judge behind any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`).

Plain `requests` rather than the `openai` package: one POST and one field of the answer are all
the judge needs, and the worker image already ships requests. The endpoint and model come from
the worker's environment (JUDGE_BASE_URL, JUDGE_MODEL), the key from JUDGE_API_KEY: never from the
job input, and the key never reaches a log line, an error message or a file (`net.scrub`).
Connection errors, timeouts, 429 and 5xx are retried with exponential backoff (`net.backoff_s`,
honouring Retry-After up to the cap); other answers fail at once with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from lora_worker.runtime.evaluation.judge import JudgeError
from lora_worker.runtime.net import UrlNotAllowed, backoff_s, check_url, redact_url, retry_after_s, scrub

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
MAX_ANSWER_TOKENS = 400  # a three-sentence reason and the verdict line, with room to spare
RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class JudgeSettings:
    """The worker's judge endpoint (from Settings: JUDGE_BASE_URL, JUDGE_API_KEY, JUDGE_MODEL)."""

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    model: str | None = None
    timeout_s: float = 120.0  # one answer; long enough for a slow large judge
    attempts: int = 5  # tries per call, the first included
    backoff_base_s: float = 2.0
    backoff_max_s: float = 60.0

    def problems(self) -> list[str]:
        """What is missing or not allowed for `evaluation.judge: openai`, each naming its variable."""
        out = []
        if not self.base_url:
            out.append("JUDGE_BASE_URL is not set on the worker")
        else:
            try:
                check_url(self.base_url)
            except UrlNotAllowed as err:
                out.append(f"JUDGE_BASE_URL {redact_url(self.base_url)}: {err}")
        if not self.model:
            out.append("JUDGE_MODEL is not set on the worker")
        return out


class OpenAIJudge:
    """Callable judge: chat messages in, the endpoint's answer text out; raises JudgeError."""

    def __init__(
        self,
        settings: JudgeSettings,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.time,
    ):
        problems = settings.problems()
        if problems:
            raise JudgeError("; ".join(problems))
        self.settings, self.sleep, self.now = settings, sleep, now
        self.session = session or requests.Session()
        self.url = settings.base_url.rstrip("/") + "/chat/completions"  # type: ignore[union-attr]
        self.label = settings.model or "the judge endpoint"

    def _safe(self, text: str) -> str:
        return scrub(text, self.settings.api_key, self.settings.base_url)

    def __call__(self, messages: list[dict[str, str]]) -> str:
        s = self.settings
        for attempt in range(1, s.attempts + 1):
            wait = self._try(messages)
            if isinstance(wait, str):
                return wait
            reason, retry_after = wait
            if attempt == s.attempts:
                raise JudgeError(f"{reason} ({s.attempts} attempts)")
            delay = backoff_s(attempt, s.backoff_base_s, s.backoff_max_s)
            if retry_after is not None:
                delay = min(s.backoff_max_s, max(delay, retry_after))
            log.warning("judge: %s; retrying in %.0f s", reason, delay)
            self.sleep(delay)
        raise JudgeError("no attempt made")  # attempts < 1

    def _try(self, messages: list[dict[str, str]]) -> str | tuple[str, float | None]:
        """The answer text, or (why, Retry-After seconds) when worth another try; raises otherwise."""
        s = self.settings
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        body = {"model": s.model, "messages": messages, "temperature": 0, "max_tokens": MAX_ANSWER_TOKENS}
        try:
            r = self.session.post(
                self.url, json=body, headers=headers, timeout=(CONNECT_TIMEOUT_S, s.timeout_s),
                allow_redirects=False,
            )  # fmt: skip
        except requests.RequestException as err:
            return self._safe(f"judge endpoint unreachable: {type(err).__name__}: {err}"), None
        where = redact_url(self.url)
        if r.status_code in RETRYABLE:
            return f"judge endpoint {where} answered HTTP {r.status_code}", retry_after_s(
                r.headers.get("Retry-After"), self.now()
            )
        if r.status_code != 200:
            raise JudgeError(
                self._safe(f"judge endpoint {where} answered HTTP {r.status_code}: {r.text[:200]}")
            )
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                self._safe(f"judge endpoint {where} gave no choices[0].message.content: {r.text[:200]}")
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"judge endpoint {where}: message content is not text")
        return content
