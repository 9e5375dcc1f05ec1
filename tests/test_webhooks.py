"""Webhook signing, verification and delivery, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lora_worker.runtime.events.signing import js_number
from lora_worker.runtime.events.webhooks import (
    WebhookSender,
    WebhookVerificationError,
    encode_event,
    sign_headers,
    verify,
)
from lora_worker.runtime.net import backoff_s, retry_after_s

WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
RAW = "plain dashboard secret"
BODY = b'{"job_id":"j1","status":"training"}'
NOW = 1_700_000_000


# --------------------------------------------------------------------------------------------
# A recording receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    arrived: float  # unix seconds on the receiver's clock when the request came in

    def verify(self, secret: str) -> None:
        """Check the signatures as a receiver does: against the time the request arrived."""
        verify(secret, self.headers, self.body, now=self.arrived)

    @property
    def event(self) -> dict:
        return json.loads(self.body)


# A responder sees the request and returns (status, extra headers); it may block.
Responder = Callable[[Received], tuple[int, dict[str, str]]]


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # unblocks held handlers

    def events(self) -> list[dict]:
        return [r.event for r in self.requests]


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    """Start a ThreadingHTTPServer on 127.0.0.1 that records every POST and answers via a responder.

    `clock` (unix seconds) stamps each request's arrival: the real clock, or the test's fake one
    when the sender's clock is fake too. `port` reuses a port (a receiver coming back).
    """
    servers: list[tuple[ThreadingHTTPServer, Receiver]] = []

    def start(responder: Responder, *, clock: Callable[[], float] = time.time, port: int = 0) -> Receiver:
        lock = threading.Lock()
        rec: Receiver

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                arrived = clock()
                length = int(self.headers.get("Content-Length", 0))
                got = Received(self.path, dict(self.headers.items()), self.rfile.read(length), arrived)
                with lock:
                    rec.requests.append(got)
                status, extra = responder(got)
                if status == 0:  # "never answer": hold the connection until the test ends
                    rec.release.wait(30)
                    return
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        rec = Receiver(
            url=f"http://127.0.0.1:{server.server_address[1]}/api/training/webhook?token=qs-credential"
        )
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append((server, rec))
        return rec

    yield start
    for server, rec in servers:
        rec.release.set()
        server.shutdown()
        server.server_close()


def always(status: int, headers: dict[str, str] | None = None) -> Responder:
    return lambda _req: (status, headers or {})


def scripted(*statuses: int) -> Responder:
    """Answer with `statuses` in turn, then 200 forever."""
    queue = list(statuses)
    lock = threading.Lock()

    def respond(_req: Received) -> tuple[int, dict[str, str]]:
        with lock:
            return (queue.pop(0) if queue else 200), {}

    return respond


class FakeTime:
    """A clock (unix seconds) that `sleep` advances instantly, recording each delay."""

    def __init__(self, start: float = NOW) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# --------------------------------------------------------------------------------------------
# Signing and verification (pure)


def test_standard_webhooks_spec_vector() -> None:
    # The example from the Standard Webhooks spec / reference libraries.
    headers = sign_headers(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert headers["webhook-signature"] == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert headers["webhook-id"] == "msg_p5jXN8AQM9LWM0D4loKWxJek"
    assert headers["webhook-timestamp"] == "1614265330"


# The vector published in docs/webhooks.md for dashboard implementers: a real training event.
DOCS_BODY = (
    b'{"cost_usd":0.59,"eta_seconds":1830.5,"evaluation":{"eval_loss":1.3125,"eval_loss_before":1.5,'
    b'"step":40},"gpu_seconds":512.3,"job_id":"3f2b8c1e-9a4d-4c7b-8e6f-1a2b3c4d5e6f",'
    b'"message":"training: step 40/200, loss 1.2340","metrics":{"epoch":0.6,"grad_norm":0.87,'
    b'"learning_rate":0.0002,"loss":1.234},"percent":20,"sequence":17,"stage":"training",'
    b'"status":"training","step":40,"timestamp":"2025-01-01T00:00:00.250Z","tokens_seen":327680,'
    b'"total_steps":200}'
)


def test_docs_example_vector() -> None:
    from lora_worker.runtime.events.event import ProgressEvent

    event = ProgressEvent.model_validate(json.loads(DOCS_BODY))  # it is a valid event
    assert encode_event(event.to_wire()) == DOCS_BODY
    headers = sign_headers(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_2b1f0c5e9d8a4c7b9e6f1a2b3c4d5e6f",
        1735689601,
        DOCS_BODY,
    )
    assert headers["webhook-signature"] == "v1,O4PIa96pk8BKPbzXcuWUl8QqDcu2P7ZFOe6GDxoweRE="
    assert (
        headers["X-Webhook-Signature"] == "a1c215bc84bd8794f9bcc93d77b6bb88b420053764eabccf85c033b546ba6464"
    )


@pytest.mark.parametrize("secret", [WHSEC, RAW])
def test_sign_verify_round_trip(secret: str) -> None:
    headers = sign_headers(secret, "msg_1", NOW, BODY)
    verify(secret, headers, BODY, now=NOW)
    # Header names are case-insensitive.
    verify(secret, {k.upper(): v for k, v in headers.items()}, BODY, now=NOW + 299)


def test_hex_signature_is_keyed_with_the_full_secret_string() -> None:
    # The seed dashboard: createHmac('sha256', process.env.WEBHOOK_SECRET).update(rawBody).digest('hex'),
    # i.e. the env text as the key, whsec_ prefix and all, not the decoded bytes.
    headers = sign_headers(WHSEC, "msg_1", NOW, BODY)
    assert headers["X-Webhook-Signature"] == hmac.new(WHSEC.encode(), BODY, hashlib.sha256).hexdigest()
    # The v1 signature, by contrast, uses the decoded key.
    decoded = base64.b64decode(WHSEC.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(decoded, b"msg_1.%d." % NOW + BODY, hashlib.sha256).digest()
    ).decode()
    assert headers["webhook-signature"] == "v1," + expected
    # A raw secret keys both with its UTF-8 bytes.
    raw = sign_headers("sécret", "msg_1", NOW, BODY)
    assert raw["X-Webhook-Signature"] == hmac.new("sécret".encode(), BODY, hashlib.sha256).hexdigest()


def test_any_v1_entry_may_match() -> None:
    headers = sign_headers(RAW, "msg_1", NOW, BODY)
    other = sign_headers("old secret", "msg_1", NOW, BODY)["webhook-signature"]
    headers["webhook-signature"] = f"v1a,ignored {other} {headers['webhook-signature']}"
    verify(RAW, headers, BODY, now=NOW)


def _rejection(secret: str, headers: dict[str, str], body: bytes, now: float = NOW) -> str:
    with pytest.raises(WebhookVerificationError) as info:
        verify(secret, headers, body, now=now)
    return str(info.value)


def test_verify_rejections_say_why() -> None:
    good = sign_headers(WHSEC, "msg_1", NOW, BODY)
    messages = {
        "tampered body": _rejection(WHSEC, good, BODY.replace(b"training", b"completed")),
        "wrong secret": _rejection(RAW, good, BODY),
        "stale": _rejection(WHSEC, sign_headers(WHSEC, "msg_1", NOW - 301, BODY), BODY),
        "future": _rejection(WHSEC, sign_headers(WHSEC, "msg_1", NOW + 301, BODY), BODY),
        "missing": _rejection(WHSEC, {k: v for k, v in good.items() if k != "webhook-signature"}, BODY),
        "bad timestamp": _rejection(WHSEC, {**good, "webhook-timestamp": "soon"}, BODY),
        "hex only wrong": _rejection(WHSEC, {**good, "X-Webhook-Signature": "0" * 64}, BODY),
    }
    assert "no v1 signature matches" in messages["tampered body"]
    # A verifier cannot tell a changed body from a wrong key: both are a signature mismatch.
    assert "no v1 signature matches" in messages["wrong secret"]
    assert "old" in messages["stale"] and "301 s" in messages["stale"]
    assert "future" in messages["future"]
    assert "missing header" in messages["missing"] and "webhook-signature" in messages["missing"]
    assert "not an integer" in messages["bad timestamp"]
    assert "X-Webhook-Signature does not match" in messages["hex only wrong"]
    distinct = {k: v for k, v in messages.items() if k != "wrong secret"}
    assert len(set(distinct.values())) == len(distinct)
    for message in messages.values():
        assert WHSEC not in message and good["webhook-signature"] not in message


def test_verify_rejects_missing_hex_header_and_replay_with_other_id() -> None:
    good = sign_headers(RAW, "msg_1", NOW, BODY)
    no_hex = {k: v for k, v in good.items() if k != "X-Webhook-Signature"}
    assert "x-webhook-signature" in _rejection(RAW, no_hex, BODY)
    assert "no v1 signature matches" in _rejection(RAW, {**good, "webhook-id": "msg_2"}, BODY)
    # Re-stamping without re-signing fails too, so the window cannot be extended by a replayer.
    assert "no v1 signature matches" in _rejection(RAW, {**good, "webhook-timestamp": str(NOW + 1)}, BODY)


def test_malformed_whsec_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError) as info:
        sign_headers("whsec_not*base64!", "msg_1", NOW, BODY)
    assert "not*base64" not in str(info.value)


def test_encode_event_is_compact_sorted_and_strict_json() -> None:
    body = encode_event(
        {"status": "training", "metrics": {"loss": float("nan"), "grad_norm": 1.5}, "step": 3}
    )
    assert body == b'{"metrics":{"grad_norm":1.5,"loss":null},"status":"training","step":3}'


@pytest.mark.parametrize(
    ("value", "js"),
    [
        (100.0, "100"),
        (20.0, "20"),
        (1e-05, "0.00001"),
        (2e-4, "0.0002"),
        (1.5e-7, "1.5e-7"),
        (1e21, "1e+21"),
        (1.2345678901234568e20, "123456789012345680000"),
        (0.1, "0.1"),
        (-0.0, "0"),
        (-3.25, "-3.25"),
        (5e-324, "5e-324"),
    ],
)
def test_numbers_are_written_as_javascript_writes_them(value: float, js: str) -> None:
    assert js_number(value) == js


# Strings, keys and numbers where Python's json.dumps and JSON.stringify differ.
AWKWARD = {
    "message": 'caf\u00e9 \u2028 "quoted" \\ tab\t nul\u0000 \u007f \U0001f600',
    "metrics": {"learning_rate": 1e-05, "loss": 100.0, "grad_norm": 1.5e-7},
    "dataset": {"10": 1, "2": 2, "b": 3, "a": 4, "01": 5},
    "tokens_seen": 2**40,
}


def test_body_is_what_javascript_writes_back_for_the_parsed_payload() -> None:
    body = encode_event(AWKWARD)
    # integer-like keys first in numeric order, as JSON.parse orders them; UTF-8, not \u escapes
    assert body.index(b'"2":2') < body.index(b'"10":1') < body.index(b'"01":5') < body.index(b'"a":4')
    assert "café".encode() in body and b"\\u00e9" not in body
    assert b'"loss":100}' in body and b'"learning_rate":0.00001' in body
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the byte-for-byte check against JSON.stringify needs it")
    script = "let s='';process.stdin.on('data',d=>s+=d).on('end',()=>process.stdout.write(JSON.stringify(JSON.parse(s))))"
    out = subprocess.run([node, "-e", script], input=body, capture_output=True, timeout=60, check=True)
    assert out.stdout == body  # so an HMAC of JSON.stringify(payload) matches one of the raw body


def test_retry_after_and_backoff() -> None:
    assert retry_after_s("7", NOW) == 7.0
    assert retry_after_s("Tue, 14 Nov 2023 22:13:30 GMT", NOW) == pytest.approx(10.0)  # NOW is 22:13:20
    assert retry_after_s("later", NOW) is None and retry_after_s(None, NOW) is None
    assert retry_after_s("-3", NOW) is None
    assert [backoff_s(n, 2.0, 60.0) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]


# --------------------------------------------------------------------------------------------
# Delivery


def test_final_event_retried_through_500s_with_stable_id_and_fresh_signatures(receiver) -> None:
    fake = FakeTime()
    rec = receiver(scripted(500, 500), clock=fake.clock)
    sender = WebhookSender(rec.url, WHSEC, final_backoff_s=0.05, sleep=fake.sleep, clock=fake.clock)
    msg_id = sender.send({"job_id": "j1", "status": "completed", "sequence": 9}, kind="final")
    assert sender.close(timeout_s=10)

    assert len(rec.requests) == 3
    assert {r.headers["webhook-id"] for r in rec.requests} == {msg_id}
    assert fake.sleeps == [0.05, 0.1]  # exponential backoff
    stamps = [int(r.headers["webhook-timestamp"]) for r in rec.requests]
    assert stamps == sorted(stamps) and stamps[0] == NOW
    for r in rec.requests:
        assert r.headers["Content-Type"] == "application/json"
        assert r.path == "/api/training/webhook?token=qs-credential"
        r.verify(WHSEC)
        assert r.event == {"job_id": "j1", "status": "completed", "sequence": 9}
    assert sender.stats() == {"delivered": 1, "failed": 0, "dropped": 0}


def test_restamped_on_each_attempt(receiver) -> None:
    fake = FakeTime()
    rec = receiver(scripted(503), clock=fake.clock)
    sender = WebhookSender(
        rec.url, RAW, final_backoff_s=400, max_backoff_s=400, sleep=fake.sleep, clock=fake.clock
    )
    sender.send({"status": "training"}, kind="stage")
    assert sender.close(timeout_s=10)
    first, second = rec.requests
    assert (first.arrived, second.arrived) == (NOW, NOW + 400)
    assert int(second.headers["webhook-timestamp"]) == NOW + 400
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]
    # Each attempt verifies when it arrives, although the first one's stamp is stale by the second's.
    first.verify(RAW)
    second.verify(RAW)
    with pytest.raises(WebhookVerificationError):
        verify(RAW, first.headers, first.body, now=second.arrived)


def test_400_is_not_retried(receiver) -> None:
    rec = receiver(always(400))
    fake = FakeTime()
    sender = WebhookSender(rec.url, RAW, final_backoff_s=0.05, sleep=fake.sleep, clock=fake.clock)
    sender.send({"status": "completed"}, kind="final")
    assert sender.close(timeout_s=10)  # definitively failed is not "undelivered"
    assert len(rec.requests) == 1 and fake.sleeps == []
    assert sender.stats() == {"delivered": 0, "failed": 1, "dropped": 0}


def test_429_is_retried_honouring_retry_after_capped(receiver) -> None:
    answers = [(429, {"Retry-After": "1"}), (429, {"Retry-After": "3600"}), (200, {})]
    rec = receiver(lambda _req: answers.pop(0))
    fake = FakeTime()
    sender = WebhookSender(
        rec.url, RAW, final_backoff_s=0.05, max_backoff_s=2, sleep=fake.sleep, clock=fake.clock
    )
    sender.send({"status": "training"}, kind="stage")
    assert sender.close(timeout_s=10)
    assert len(rec.requests) == 3
    assert fake.sleeps == [1.0, 2.0]  # Retry-After honoured, then capped at max_backoff_s
    assert sender.stats()["delivered"] == 1


def test_gives_up_after_final_attempts_on_connection_refused() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = FakeTime()
    sender = WebhookSender(
        f"http://127.0.0.1:{port}/hook", RAW, final_attempts=3, sleep=fake.sleep, clock=fake.clock
    )
    sender.send({"status": "failed"}, kind="final")
    assert sender.close(timeout_s=10)
    assert len(fake.sleeps) == 2
    assert sender.stats() == {"delivered": 0, "failed": 1, "dropped": 0}


def test_superseded_progress_is_dropped_but_stage_and_final_are_not(receiver) -> None:
    gate = threading.Event()

    def respond(req: Received) -> tuple[int, dict[str, str]]:
        if req.event["sequence"] == 0:
            gate.wait(10)  # hold the first delivery so the rest pile up behind it
        return 200, {}

    rec = receiver(respond)
    sender = WebhookSender(rec.url, RAW, final_backoff_s=0.05)
    sender.send({"status": "training", "sequence": 0}, kind="stage")
    sender.send({"status": "training", "sequence": 1, "step": 1}, kind="progress")
    sender.send({"status": "training", "sequence": 2, "step": 2}, kind="progress")
    sender.send({"status": "completed", "sequence": 3}, kind="final")
    sender.send({"status": "completed", "sequence": 4, "step": 3}, kind="progress")
    gate.set()
    assert sender.close(timeout_s=10)
    # 1 and 2 had newer events waiting; the final is kept although 4 is newer; 4 is the last.
    assert [e["sequence"] for e in rec.events()] == [0, 3, 4]
    assert sender.stats() == {"delivered": 3, "failed": 0, "dropped": 2}


def test_progress_gets_only_progress_attempts(receiver) -> None:
    rec = receiver(always(500))
    fake = FakeTime()
    sender = WebhookSender(
        rec.url, RAW, progress_attempts=2, final_attempts=5, sleep=fake.sleep, clock=fake.clock
    )
    sender.send({"status": "training", "step": 1}, kind="progress")
    assert sender.close(timeout_s=10)
    assert len(rec.requests) == 2
    assert sender.stats() == {"delivered": 0, "failed": 1, "dropped": 0}


def test_failing_progress_is_dropped_once_a_newer_event_waits(receiver) -> None:
    sender: WebhookSender
    queued = threading.Event()

    def respond(req: Received) -> tuple[int, dict[str, str]]:
        if req.event["status"] == "training":
            if not queued.is_set():
                # The stage event is queued while the progress attempt is in flight.
                sender.send({"status": "evaluating"}, kind="stage")
                queued.set()
            return 503, {}
        return 200, {}

    rec = receiver(respond)
    fake = FakeTime()
    sender = WebhookSender(rec.url, RAW, progress_attempts=5, sleep=fake.sleep, clock=fake.clock)
    sender.send({"status": "training", "step": 1}, kind="progress")
    assert queued.wait(10)
    assert sender.close(timeout_s=10)
    assert [e["status"] for e in rec.events()] == ["training", "evaluating"]
    assert sender.stats() == {"delivered": 1, "failed": 0, "dropped": 1}


def test_events_arrive_in_order_despite_retries(receiver) -> None:
    seen: set[int] = set()

    def flaky(req: Received) -> tuple[int, dict[str, str]]:
        seq = req.event["sequence"]
        if seq % 4 == 1 and seq not in seen:  # every fourth event fails its first attempt
            seen.add(seq)
            return 500, {}
        return 200, {}

    rec = receiver(flaky)
    sender = WebhookSender(rec.url, RAW, final_backoff_s=0.01)
    for seq in range(11):
        sender.send({"status": "training", "sequence": seq}, kind="stage")
    sender.send({"status": "completed", "sequence": 11}, kind="final")
    assert sender.close(timeout_s=10)
    arrivals = [e["sequence"] for e in rec.events()]
    assert arrivals == sorted(arrivals)  # a retry repeats an event, never goes back past a newer one
    delivered = sorted(set(arrivals) - {s for s in seen if arrivals.count(s) == 1})
    # a failed stage event is retried unless a newer stage event already waits (then dropped)
    assert set(range(12)) - set(delivered) <= {1, 5, 9} and delivered[-1] == 11
    stats = sender.stats()
    assert stats["failed"] == 0 and stats["delivered"] + stats["dropped"] == 12
    assert stats["dropped"] == 12 - len(delivered)


# --------------------------------------------------------------------------------------------
# Never starved: a receiver that is down must not keep the newest state from it


def _stage_events() -> list[tuple[dict, str]]:
    return [
        ({"job_id": "j", "stage": "queued", "status": "queued", "sequence": 1}, "stage"),
        ({"job_id": "j", "stage": "preprocessing", "status": "preprocessing", "sequence": 2}, "stage"),
        ({"job_id": "j", "stage": "training", "status": "training", "sequence": 3, "step": 1}, "progress"),
        ({"job_id": "j", "stage": "evaluating", "status": "training", "sequence": 4}, "stage"),
        ({"job_id": "j", "stage": "completed", "status": "completed", "sequence": 5}, "final"),
    ]


def test_a_receiver_that_was_down_still_gets_the_final_event(receiver) -> None:
    """Connection refused for every event until the receiver comes back on its port."""
    port = _free_port()  # nothing listens here yet: connections are refused
    fake = FakeTime()
    all_queued = threading.Event()
    back: list[Receiver] = []

    def clock() -> float:  # the first attempt waits until the job's events are all queued
        all_queued.wait(10)
        return fake.clock()

    def sleep(seconds: float) -> None:  # time passes: the receiver comes back
        fake.sleep(seconds)
        if not back:
            back.append(receiver(always(200), clock=fake.clock, port=port))

    sender = WebhookSender(f"http://127.0.0.1:{port}/api/training/webhook", WHSEC, sleep=sleep, clock=clock)
    for event, kind in _stage_events():
        sender.send(event, kind=kind)
    all_queued.set()
    assert sender.close(timeout_s=30)

    (rec,) = back
    assert [r.event["stage"] for r in rec.requests] == ["completed"]
    rec.requests[0].verify(WHSEC)
    # queued, preprocessing and evaluating each failed once and stepped aside; the progress event
    # was superseded before its first attempt; the final event kept retrying until it got through.
    assert sender.stats() == {"delivered": 1, "failed": 0, "dropped": 4}
    assert len(fake.sleeps) == 1


def test_503_stage_events_step_aside_and_the_final_event_keeps_its_retries(receiver) -> None:
    fake = FakeTime()
    rec = receiver(scripted(*[503] * 7), clock=fake.clock)
    all_queued = threading.Event()

    def clock() -> float:
        all_queued.wait(10)
        return fake.clock()

    sender = WebhookSender(rec.url, RAW, final_attempts=5, sleep=fake.sleep, clock=clock)
    for event, kind in _stage_events():
        sender.send(event, kind=kind)
    all_queued.set()
    assert sender.close(timeout_s=30)

    stages = [r.event["stage"] for r in rec.requests]
    assert stages == ["queued", "preprocessing", "evaluating", "completed", "completed", "completed",
                      "completed", "completed"]  # fmt: skip
    for r in rec.requests:
        r.verify(RAW)  # each attempt verifies at the time it arrived on the (fake) clock
    assert sender.stats() == {"delivered": 1, "failed": 0, "dropped": 3 + 1}
    assert fake.sleeps == [2.0, 4.0, 8.0, 16.0]  # the final event's own backoff, from its first try


def test_a_failing_stage_event_keeps_retrying_while_only_progress_waits(receiver) -> None:
    fake = FakeTime()
    rec = receiver(scripted(503, 503), clock=fake.clock)
    all_queued = threading.Event()

    def clock() -> float:
        all_queued.wait(10)
        return fake.clock()

    sender = WebhookSender(rec.url, RAW, sleep=fake.sleep, clock=clock)
    sender.send({"stage": "preprocessing", "sequence": 1, "dataset": {"conversations": 24}}, kind="stage")
    sender.send({"stage": "training", "sequence": 2, "step": 1}, kind="progress")
    all_queued.set()
    assert sender.close(timeout_s=30)
    assert [r.event["sequence"] for r in rec.requests] == [1, 1, 1, 2]
    assert sender.stats() == {"delivered": 2, "failed": 0, "dropped": 0}


def test_a_waiting_retry_wakes_when_a_newer_stage_event_arrives(receiver) -> None:
    """With the real sleep: a stage event waiting a 60 s backoff steps aside at once for the final one."""
    first_failed = threading.Event()

    def respond(req: Received) -> tuple[int, dict[str, str]]:
        if req.event["stage"] == "queued":
            first_failed.set()
            return 503, {}
        return 200, {}

    rec = receiver(respond)
    sender = WebhookSender(rec.url, RAW, final_backoff_s=60, max_backoff_s=60)
    sender.send({"stage": "queued", "sequence": 1}, kind="stage")
    assert first_failed.wait(10)
    started = time.monotonic()
    sender.send({"stage": "completed", "sequence": 2}, kind="final")
    assert sender.close(timeout_s=30)
    assert time.monotonic() - started < 20  # far less than the 60 s backoff, even on a busy machine
    assert [r.event["stage"] for r in rec.requests] == ["queued", "completed"]
    for r in rec.requests:
        r.verify(RAW)
    assert sender.stats() == {"delivered": 1, "failed": 0, "dropped": 1}


def test_close_is_bounded_when_the_receiver_never_answers(receiver) -> None:
    rec = receiver(always(0))  # accepts, reads the request, never responds
    sender = WebhookSender(rec.url, RAW, timeout_s=10, final_backoff_s=0.05)
    sender.send({"status": "completed"}, kind="final")
    sender.send({"status": "completed", "sequence": 2}, kind="final")
    started = time.monotonic()
    assert sender.close(timeout_s=1) is False
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 6  # waited for its deadline, not for the 10 s read timeout
    assert 1 <= len(rec.requests) <= 2  # the first event only (a retry may start at the deadline)
    assert all(r.event["status"] == "completed" and "sequence" not in r.event for r in rec.requests)
    assert sender.stats()["failed"] >= 1  # the queued one at once; the in-flight one when it ends
    # Late events after close are refused, not queued.
    sender.send({"status": "completed"}, kind="final")
    assert sender.stats()["failed"] >= 2


def test_no_secret_or_signature_in_logs(receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lora_worker.runtime.events.webhooks")
    rec = receiver(scripted(500, 400))
    sender = WebhookSender(rec.url, WHSEC, final_backoff_s=0.01)
    sender.send({"status": "evaluating"}, kind="stage")  # 500, then 400: fails
    sender.send({"status": "training", "step": 1}, kind="progress")  # 200
    assert sender.close(timeout_s=10)
    refused = WebhookSender(
        f"http://user:pw-credential@127.0.0.1:{_free_port()}/hook?k=qs-credential",
        WHSEC,
        final_attempts=2,
        final_backoff_s=0.01,
    )
    refused.send({"status": "failed"}, kind="final")
    assert refused.close(timeout_s=10)

    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP 500" in text and "HTTP 400" in text and "ConnectionError" in text and "delivered" in text
    assert "127.0.0.1" in text and "/api/training/webhook" in text
    secrets = [WHSEC, WHSEC.removeprefix("whsec_"), "qs-credential", "pw-credential"]
    signatures = [r.headers[h] for r in rec.requests for h in ("webhook-signature", "X-Webhook-Signature")]
    for value in secrets + [s.removeprefix("v1,") for s in signatures]:
        assert value not in text
        assert all(value not in repr(r.args) for r in caplog.records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_constructor_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        WebhookSender("ftp://example/hook", RAW)
    with pytest.raises(ValueError):
        WebhookSender("http://127.0.0.1/hook", "whsec_***")
    with pytest.raises(ValueError):
        WebhookSender("http://127.0.0.1/hook", RAW, final_attempts=0)
