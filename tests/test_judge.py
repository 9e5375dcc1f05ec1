"""The blind pairwise judge: verdict parsing, both orders, ties on disagreement, the time budget,
the OpenAI-compatible client against a real loopback stand-in (retries, backoff, the key kept
secret), and `judge: self` on the tiny model."""

from __future__ import annotations

import logging

import pytest
import torch
from fake_openai import FakeOpenAI, replies_of
from training_builders import lora_model

from lora_worker.runtime.data.conversation import ConsultantProfile
from lora_worker.runtime.evaluation.judge import (
    DEFAULT_CRITERIA,
    JudgeError,
    Pair,
    SelfJudge,
    build_rubric,
    judge_messages,
    parse_verdict,
    run_judge,
)
from lora_worker.runtime.evaluation.judge_openai import JudgeSettings, OpenAIJudge
from lora_worker.runtime.evaluation.preference import preference_rates, preference_sentence, sign_test

KEY = "sk-test-very-secret-key-1234567890"


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Reply A is warmer.\nWINNER: A", "A"),
        ("b is better\n**WINNER: B**", "B"),
        ("Both fine.\nwinner: tie", "tie"),
        ("WINNER: [A]", "A"),
        ("The format is WINNER: A, WINNER: B or WINNER: TIE.\nWINNER: B", "B"),  # strict last line wins
        ("I prefer A. WINNER: A. Though WINNER: B is close", None),  # contradicts itself
        ("I cannot decide.", None),
        ("", None),
        ("WINNER: C", None),
    ],
)
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


def test_claims_need_an_interval_clear_of_zero_and_a_sign_test() -> None:
    assert sign_test(4, 0) == 0.125 and sign_test(6, 0) == 0.03125 and sign_test(3, 3) == 1.0
    four = preference_rates(["adapted"] * 4, seed=0)
    assert (
        four.net.interval_95 == (1.0, 1.0) and not four.conclusive
    )  # the bootstrap collapses; the test does not
    assert (
        "4 decisive scenarios are too few to claim a difference (sign test p = 0.12)"
        in preference_sentence(four, judged_by="j")
    )
    strong = preference_rates(["adapted"] * 12 + ["tie"] * 3 + ["base"], seed=0)
    assert strong.conclusive and strong.wins == 12 and strong.losses == 1
    assert preference_sentence(strong, judged_by="j").startswith(
        "Judged blind by j on 16 scenarios, the adapted model's reply was preferred in 75 % (95 % interval"
    )
    assert "favours the adapted model." in preference_sentence(strong, judged_by="j")
    even = preference_rates(["adapted", "base"] * 5, seed=0)
    assert "includes zero, too wide to claim a difference." in preference_sentence(even, judged_by="j")
    assert (
        preference_sentence(None, judged_by="j")
        == "No scenario was judged, so there is no comparison of replies."
    )
    one = preference_rates(["adapted"], seed=0)
    assert "with a single scenario there is no interval" in preference_sentence(one, judged_by="j")


def test_rubric_uses_the_consultant_profile_and_defaults() -> None:
    profile = ConsultantProfile(name="Elena Morales", tone="warm, plain-spoken", avoid=("jargon",))
    rubric = build_rubric(profile)
    assert "Elena Morales" in rubric and "warm, plain-spoken" in rubric and "jargon" in rubric
    assert all(c in rubric for c in DEFAULT_CRITERIA)
    assert all(c in build_rubric(None) for c in DEFAULT_CRITERIA)


def test_judge_prompt_is_blind() -> None:
    messages = judge_messages([{"role": "user", "content": "help"}], "first reply", "second reply", "rubric")
    text = " ".join(m["content"] for m in messages).lower()
    assert "first reply" in text and "second reply" in text
    for word in ("adapter", "adapted", "base model", "fine-tun"):
        assert word not in text


# ----------------------------------------------------------------------------- scripted judging

BEHAVIOUR = {  # the scenario's user message -> how the scripted judge answers
    "s1": "adapted",
    "s2": "base",
    "s3": "always A",
    "s4": "tie",
    "s5": "garbage",
    "s6": "adapted",
}
TAGS = {"s1": "conflict", "s2": "conflict", "s3": "grief", "s4": "grief", "s5": "grief", "s6": "conflict"}


def pairs() -> list[Pair]:
    return [
        Pair(
            sid,
            [{"role": "user", "content": sid}],
            f"base reply {sid}",
            f"adapted reply {sid}",
            {"arc": TAGS[sid]},
        )
        for sid in BEHAVIOUR
    ]


def scripted(request: dict) -> str:
    a, b = replies_of(request)
    sid = request["messages"][-1]["content"].split("[User]\n", 1)[1].split("\n", 1)[0]
    behaviour = BEHAVIOUR[sid]
    if behaviour in ("adapted", "base"):
        return f"Better reply.\nWINNER: {'A' if behaviour in a else 'B'}"
    return {"always A": "WINNER: A", "tie": "Equal.\nWINNER: TIE", "garbage": "Hmm, hard to say."}[behaviour]


def check_scripted(report) -> None:
    overall = report.summary.overall
    assert (overall.n, overall.wins, overall.losses, overall.ties) == (6, 2, 1, 3)
    assert overall.win.share == pytest.approx(2 / 6, abs=1e-4)
    assert overall.loss.share == pytest.approx(1 / 6, abs=1e-4)
    assert overall.tie.share == pytest.approx(3 / 6, abs=1e-4)
    assert report.unparseable == 2 and report.disagreements == 1
    by_id = {p.scenario_id: p for p in report.pairs}
    assert by_id["s3"].preference == "tie" and by_id["s3"].verdicts == ("A", "A")
    assert set(by_id["s3"].picks) == {"adapted", "base"}  # position bias cancelled into a tie
    assert by_id["s5"].verdicts == ("unparseable", "unparseable")
    arcs = {r.value: r.rates for r in report.summary.slices["arc"]}
    assert (arcs["conflict"].wins, arcs["conflict"].losses, arcs["grief"].ties) == (2, 1, 3)


def test_run_judge_counts_both_orders_and_ties_on_disagreement() -> None:
    ask_log = []

    def ask(messages):
        ask_log.append(messages)
        return scripted({"messages": messages})

    report = run_judge(ask, pairs(), "rubric", kind="openai", judged_by="fake", seed=3, max_minutes=30)
    check_scripted(report)
    assert report.judged == 6 and report.calls == 12 and len(ask_log) == 12 and report.stopped is None
    # Each pair was shown in both orders: the second call swaps the replies of the first.
    for first, second in zip(ask_log[::2], ask_log[1::2], strict=True):
        assert replies_of({"messages": first}) == tuple(reversed(replies_of({"messages": second})))
    # The first order is seeded, not fixed: some pairs start with the adapted reply, some with the base.
    assert {p.first_a for p in report.pairs} == {"adapted", "base"}
    assert "too wide to claim a difference" in report.headline
    assert report.headline.endswith("2 of 12 judge answers named no verdict and count as ties.")


def test_openai_judge_against_loopback_stand_in(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(scripted) as server:
        judge = OpenAIJudge(JudgeSettings(base_url=server.base, api_key=KEY, model="fake-judge"))
        report = run_judge(
            judge, pairs(), "rubric", kind="openai", judged_by=judge.label, seed=3, max_minutes=30
        )
    check_scripted(report)
    assert len(server.requests) == 12
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["authorization"] == f"Bearer {KEY}"
    assert body["model"] == "fake-judge" and body["temperature"] == 0
    assert KEY not in report.model_dump_json() and KEY not in caplog.text
    assert report.judged_by == "fake-judge"


def test_openai_judge_retries_with_backoff_and_retry_after() -> None:
    answers = iter([(503, "busy"), (429, {"error": "slow down"}, {"Retry-After": "7"}), "WINNER: A"])
    slept: list[float] = []
    with FakeOpenAI(lambda request: next(answers)) as server:
        settings = JudgeSettings(
            base_url=server.base, api_key=KEY, model="m", backoff_base_s=2, backoff_max_s=60
        )
        judge = OpenAIJudge(settings, sleep=slept.append)
        assert judge([{"role": "user", "content": "x"}]) == "WINNER: A"
    assert slept == [2.0, 7.0]  # backoff_s(1) = 2 s, then Retry-After 7 s over backoff_s(2) = 4 s


def test_openai_judge_failure_names_status_never_the_key(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    # The endpoint echoes the key back in its error body: the message must still not carry it.
    with FakeOpenAI(lambda request: (401, {"error": f"invalid key {KEY}"})) as server:
        judge = OpenAIJudge(JudgeSettings(base_url=server.base, api_key=KEY, model="m"), sleep=lambda s: None)
        with pytest.raises(JudgeError) as err:
            judge([{"role": "user", "content": "x"}])
        report = run_judge(judge, pairs(), "rubric", kind="openai", judged_by="m", seed=0, max_minutes=30)
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value)
    assert report.judged == 0 and report.summary.overall is None
    assert report.stopped.startswith("judged 0 of 6 scenarios: the judge failed: ")
    assert KEY not in report.model_dump_json() and KEY not in caplog.text


def test_openai_judge_gives_up_after_its_attempts_on_a_dead_port() -> None:
    with FakeOpenAI(lambda request: "unused") as server:
        base = server.base
    slept: list[float] = []
    judge = OpenAIJudge(JudgeSettings(base_url=base, api_key=KEY, model="m", attempts=3), sleep=slept.append)
    with pytest.raises(JudgeError, match=r"unreachable.*\(3 attempts\)"):
        judge([{"role": "user", "content": "x"}])
    assert slept == [2.0, 4.0]


def test_settings_problems_name_the_variables() -> None:
    assert JudgeSettings().problems() == [
        "JUDGE_BASE_URL is not set on the worker",
        "JUDGE_MODEL is not set on the worker",
    ]
    bad = JudgeSettings(base_url="http://judge.example.com/v1?key=abc", model="m").problems()
    assert bad == ["JUDGE_BASE_URL http://judge.example.com/v1: must be an https:// URL"]
    assert "JudgeSettings" in repr(JudgeSettings(api_key=KEY)) and KEY not in repr(JudgeSettings(api_key=KEY))


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_judging_stops_before_the_time_budget() -> None:
    clock = FakeClock()

    def slow(messages):
        clock.t += 30.0  # each judge call takes 30 s: a pair (two orders) takes 60 s
        return "WINNER: TIE"

    report = run_judge(slow, pairs(), "r", kind="self", judged_by="b", seed=0, max_minutes=3.5, clock=clock)
    assert report.judged == 3  # 180 s spent; a fourth pair would end at 240 s > 210 s
    assert report.stopped.startswith("judged 3 of 6 scenarios: the next would pass max_judge_minutes 3.5")
    # The estimate bounds the first pair too: an estimate over the budget judges nothing.
    none = run_judge(
        slow,
        pairs(),
        "r",
        kind="self",
        judged_by="b",
        seed=0,
        max_minutes=1,
        estimated_pair_s=90,
        clock=clock,
    )
    assert none.judged == 0 and none.stopped


# ----------------------------------------------------------------------------- judge: self


def test_self_judge_runs_on_the_tiny_model_with_the_adapter_disabled(tiny_model, tokenizer) -> None:
    model = lora_model(tiny_model, checkpointing=False)
    with torch.no_grad():  # a non-identity adapter, so adapted and base outputs differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    judge = SelfJudge(model, tokenizer, max_new_tokens=6)
    some = pairs()[:2]
    report = run_judge(
        judge, some, build_rubric(None), kind="self", judged_by=judge.label, seed=1, max_minutes=30
    )
    assert report.judged == 2 and report.calls == 4 and report.judged_by == "the base model"
    # A random tiny model names no verdict: every answer is unparseable and each pair a tie.
    assert report.unparseable == 4 and report.summary.overall.ties == 2
    assert report.headline.endswith(
        "every scenario was a tie, so no difference shows. 4 of 4 judge answers named no verdict and count as ties."
    )
    ids = tokenizer.apply_chat_template(
        judge_messages(some[0].conversation, "a", "b", "r"),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        adapted_logits = model(**ids).logits
        judge(judge_messages(some[0].conversation, "a", "b", "r"))
        after_logits = model(**ids).logits  # the adapter is enabled again after judging
        with model.disable_adapter():
            base_logits = model(**ids).logits
    assert torch.equal(adapted_logits, after_logits)
    assert not torch.equal(adapted_logits, base_logits)
