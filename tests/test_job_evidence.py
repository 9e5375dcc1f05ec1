"""The evidence through whole jobs: a scripted OpenAI-compatible judge on loopback whose verdicts the
job's win rates must reproduce (both orders, ties on disagreement), the self judge on the tiny model,
and a chat-JSONL file without metadata that says which slices it could not make."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from conftest import Recorder, small_job
from fake_openai import FakeOpenAI, replies_of

from lora_worker.runtime.contracts import Report
from lora_worker.runtime.job import run_job
from lora_worker.runtime.settings import Settings

pytestmark = pytest.mark.e2e


def scripted(request: dict) -> str:
    """Half the pairs (chosen from their texts, whatever the order): the position-biased judge says A
    both times, which disagrees across orders. The other half: the alphabetically first reply wins."""
    a, b = replies_of(request)
    if a == b:
        return "Same.\nWINNER: TIE"
    if int(hashlib.sha256("\0".join(sorted((a, b))).encode()).hexdigest(), 16) % 2:
        return "A reads better.\nWINNER: A"
    return f"The {'first' if a < b else 'second'} is better.\nWINNER: {'A' if a < b else 'B'}"


def expected(scenarios: list[dict]) -> tuple[int, int, int]:
    wins = ties = losses = 0
    for s in scenarios:
        base, adapted = s["base"], s["adapted"]
        biased = int(hashlib.sha256("\0".join(sorted((base, adapted))).encode()).hexdigest(), 16) % 2
        if base == adapted or biased:
            ties += 1
        elif adapted < base:
            wins += 1
        else:
            losses += 1
    return wins, ties, losses


def test_an_openai_judge_on_loopback_gives_the_scripted_win_rates(tiny_model, small_dataset, tmp_path):
    server = FakeOpenAI(scripted)
    settings = Settings.from_env(
        {
            "VOLUME_DIR": str(tmp_path),
            "JUDGE_BASE_URL": server.base,
            "JUDGE_API_KEY": "sk-judge-secret-123",
            "JUDGE_MODEL": "fake-judge",
        }
    )
    job = small_job(
        tiny_model,
        small_dataset,
        job_id="judged",
        hyperparameters={"learning_rate": 0.01},
        evaluation={"judge": "openai", "num_scenarios": 6, "max_new_tokens": 6, "eval_fraction": 0.34},
    )
    try:
        result = run_job(job, settings=settings)
    finally:
        server.close()
    assert result["status"] == "completed", result
    report = Report.model_validate_json(open(result["report"]["json"]).read())
    judge = report.evidence.judge
    scenarios = [s.model_dump() for s in report.evidence.scenarios]
    assert scenarios and judge is not None and judge.kind == "openai"
    overall = judge.summary.overall
    assert (overall.wins, overall.ties, overall.losses) == expected(scenarios)
    assert len(server.requests) == 2 * len(scenarios)  # every pair judged in both orders
    assert result["evidence"]["judge"]["overall"]["n"] == len(scenarios)
    # the judge's key reaches the endpoint and nothing else
    assert all(h.get("authorization") == "Bearer sk-judge-secret-123" for _, h, _ in server.requests)
    job_dir = tmp_path / "jobs" / "judged"
    assert not any(b"sk-judge-secret-123" in p.read_bytes() for p in job_dir.rglob("*") if p.is_file())
    md = (job_dir / "report" / "report.md").read_text()
    assert re.search(rf"\| Adapted model preferred \(win\) \| {overall.wins} \|", md), md
    assert "Adapted model preferred (win)" in (job_dir / "report" / "report.html").read_text()


def test_a_self_judge_runs_on_the_tiny_model(tiny_model, small_dataset, tmp_path):
    result = run_job(
        small_job(
            tiny_model,
            small_dataset,
            job_id="self-judged",
            evaluation={"judge": "self", "num_scenarios": 2, "max_new_tokens": 4},
        ),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
    )
    assert result["status"] == "completed", result
    judge = result["evidence"]["judge"]
    assert judge["kind"] == "self" and judge["overall"]["n"] == 2
    # a random-weight judge writes no readable verdict: counted as ties, and the headline says so
    assert judge["overall"]["ties"] == 2


def test_a_chat_jsonl_file_without_metadata_runs_and_names_the_slices_it_could_not_make(
    tiny_model, small_dataset, tmp_path
):
    doc = json.loads(small_dataset.read_text())
    lines = []
    for conv in doc["conversations"]:
        pairs = conv["training_pairs"]
        last = pairs[-1]
        messages = [{"role": "system", "content": last["system_prompt"]}, *last["conversation_history"]]
        messages += [{"role": "user", "content": last["current_user_input"]}]
        messages += [{"role": "assistant", "content": last["target_response"] or "Thank you."}]
        lines.append(json.dumps({"messages": messages}))
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    seen = Recorder()
    result = run_job(
        small_job(tiny_model, small_dataset, job_id="jsonl", dataset_path=str(data)),
        settings=Settings.from_env({"VOLUME_DIR": str(tmp_path)}),
        channels=(seen,),
    )
    assert result["status"] == "completed", result
    assert result["dataset"]["format"] == "chat-jsonl"
    unavailable = result["evidence"]["slices_unavailable"]
    assert [u.split(":")[0] for u in unavailable] == ["emotional arc", "persona", "topic"]
    assert all("no held-out conversation is labelled" in u for u in unavailable)
    md = open(result["report"]["markdown"]).read()
    assert "Slices that could not be made" in md
