"""Progress events: rate limits, ordering, and no late update over the final result."""

from __future__ import annotations

import json
import random
import time

import pytest
from conftest import LoopbackServer

from lora_worker.runtime.events.progress import CostMeter, Reporter, RunPodChannel


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_is_rate_limited_but_stages_always_go():
    clock = Clock()
    sent = []

    class Ch:
        def send(self, e, *, kind):
            sent.append((kind, e["status"], e["step"]))

        def close(self, t):
            return True

    r = Reporter("j", meter=CostMeter(3.6, clock), channels=[Ch()], min_interval_s=10, clock=clock)
    r.stage("training", total_steps=100)
    for step in range(1, 30):
        clock.t += 1.0
        r.progress(step=step, total_steps=100)
    r.stage("evaluating")
    assert [s for s in sent if s[0] == "progress"] == [
        ("progress", "training", 10),
        ("progress", "training", 20),
    ]
    assert sent[-1] == ("stage", "evaluating", 29)  # the stage event carries the latest step
    assert [e["sequence"] for e in r.events] == list(range(1, len(r.events) + 1))
    assert r.events[-1]["gpu_seconds"] == 29.0 and r.events[-1]["cost_usd"] == pytest.approx(0.029)
    assert r.events[-1]["percent"] == 29.0


def test_no_late_progress_overwrites_the_final_result(monkeypatch):
    """The channel sends in order and is drained before the result is posted."""
    import requests

    def slow_status_service(method, path, headers, body):
        time.sleep(random.uniform(0, 0.03))  # a slow, jittery service
        return 200

    server = LoopbackServer(slow_status_service)  # the last body POSTed is what /status shows
    url = f"{server.base}/job-done"
    random.seed(0)

    def send(job, event):  # the same HTTP shape as the SDK's progress post
        requests.post(url, json={"status": "IN_PROGRESS", "output": event}, timeout=5)

    ch = RunPodChannel({"id": "j"}, send=send)
    for i in range(50):
        ch.send({"sequence": i, "status": "training"})
    ch.send({"sequence": 50, "status": "completed"})
    assert ch.close(timeout_s=10)
    # now the SDK posts the job's result; nothing of ours can arrive after it
    requests.post(url, json={"status": "COMPLETED", "output": {"final": True}}, timeout=5)
    time.sleep(0.1)
    bodies = [json.loads(b) for _, _, _, b in server.requests]
    assert bodies[-1]["status"] == "COMPLETED"
    seqs = [b["output"]["sequence"] for b in bodies[:-1]]
    assert seqs == sorted(seqs) and seqs[-1] == 50  # superseded updates dropped, never reordered
    server.close()


def test_sdk_progress_update_alone_can_reorder(monkeypatch):
    """Why RunPodChannel exists: the SDK's progress_update starts one thread per call, unordered."""
    import runpod.serverless.modules.rp_progress as rp

    arrivals = []

    def fake_target(job, progress):
        time.sleep(0.05 if progress == 1 else 0.0)
        arrivals.append(progress)

    monkeypatch.setattr(rp, "_thread_target", fake_target)
    rp.progress_update({"id": "j"}, 1)
    rp.progress_update({"id": "j"}, 2)
    time.sleep(0.2)
    assert arrivals == [2, 1]  # the older update landed last
