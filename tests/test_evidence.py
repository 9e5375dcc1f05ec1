"""The evidence after training: slices, scenarios, end of turn, forgetting, and gather_evidence on
the tiny model (with a loopback OpenAI-compatible judge, and on a file without metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, LoopbackServer
from fake_openai import FakeOpenAI, replies_of
from training_builders import lora_model

from lora_worker.runtime.data import DatasetError, load_dataset, prepare_dataset
from lora_worker.runtime.data.conversation import Conversation, Message, Scaffolding
from lora_worker.runtime.data.examples import build_examples
from lora_worker.runtime.delivery.report import write_report
from lora_worker.runtime.device import Device
from lora_worker.runtime.evaluation.end_of_turn import end_of_turn_check
from lora_worker.runtime.evaluation.evidence import estimate_judge, gather_evidence, resolve_judge
from lora_worker.runtime.evaluation.forgetting import compare, forgetting_probe, load_probe
from lora_worker.runtime.evaluation.judge_openai import JudgeSettings
from lora_worker.runtime.evaluation.loss import HeldOutLoss, held_out_loss
from lora_worker.runtime.evaluation.replies import Reply, greedy_replies
from lora_worker.runtime.evaluation.scenarios import held_out_scenarios, load_scenarios, parse_scenarios
from lora_worker.runtime.evaluation.slices import slice_tables
from lora_worker.runtime.evaluation.stats import bootstrap_mean_interval
from lora_worker.runtime.spec import JobInputError, parse_job_input

CPU = Device(kind="cpu", name="cpu")
H100 = Device(kind="cuda", name="NVIDIA H100 80GB HBM3", count=1)


def loss(per: dict[str, float]) -> HeldOutLoss:
    return HeldOutLoss(mean=sum(per.values()) / len(per), tokens=100, per_conversation=per, token_budget=4096)


def convo(cid: str, arc: str | None = None, persona: str | None = None, turns: int = 2) -> Conversation:
    messages = [Message("system", "Be kind.")]
    for t in range(turns):
        messages += [
            Message("user", f"{cid} question {t}"),
            Message("assistant", f"{cid} answer {t}", train=True),
        ]
    scaffolding = Scaffolding(persona=persona, emotional_arc=arc, topic=None) if arc or persona else None
    return Conversation(cid, tuple(messages), scaffolding)


# ----------------------------------------------------------------------------- slices


def test_slices_per_conversation_and_per_arc() -> None:
    convs = [convo("a", "grief", "p1"), convo("b", "grief", "p2"), convo("c", "conflict", "p1")]
    # c was trained pair by pair: its two pieces average into one conversation
    convs += [Conversation("c#t2", convs[2].messages, convs[2].scaffolding)]
    before = loss({"a": 2.0, "b": 3.0, "c": 2.0, "c#t2": 4.0})
    after = loss({"a": 1.5, "b": 2.0, "c": 2.5, "c#t2": 3.5})
    t = slice_tables(before, after, convs, seed=7)
    assert [(c.conversation_id, c.delta) for c in t.conversations] == [("a", -0.5), ("b", -1.0), ("c", 0.0)]
    grief = next(r for r in t.tables["arc"] if r.value == "grief")
    assert (grief.n, grief.mean_before, grief.mean_after, grief.mean_delta) == (2, 2.5, 1.75, -0.75)
    lo, hi = bootstrap_mean_interval([-0.5, -1.0], seed=7)
    assert grief.interval_95 == (round(lo, 6), round(hi, 6))
    conflict = next(r for r in t.tables["arc"] if r.value == "conflict")
    assert conflict.n == 1 and conflict.interval_95 is None  # one conversation: no interval
    assert [r.value for r in t.tables["persona"]] == ["p1", "p2"]
    assert t.unavailable == [
        "topic: no held-out conversation is labelled with one (the file has no conversation_metadata.scaffolding for it)"
    ]


def test_slices_without_metadata_or_measurement_say_why() -> None:
    convs = [convo("a"), convo("b")]
    t = slice_tables(loss({"a": 1.0, "b": 2.0}), loss({"a": 0.5, "b": 2.5}), convs, seed=0)
    assert t.tables == {} and len(t.conversations) == 2
    assert [u.split(":")[0] for u in t.unavailable] == ["emotional arc", "persona", "topic"]
    assert slice_tables(None, None, convs, seed=0).unavailable == [
        "no held-out loss was measured before and after, so no slice could be made"
    ]


# ----------------------------------------------------------------------------- scenarios

GOOD = {
    "messages": [{"role": "user", "content": "We argue about money."}],
    "tags": {"arc": "conflict", "n": 3},
}


def test_scenario_file_problems_name_their_lines() -> None:
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({**GOOD, "refrence": "typo"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "tags": {"arc": ["a"]}}),
    ]
    with pytest.raises(DatasetError) as err:
        parse_scenarios("\n".join(lines), "scenarios.jsonl")
    problems = err.value.problems
    assert problems[0].startswith("line 2: not valid JSON")
    assert problems[1] == "line 3: messages must end with a user turn (the one the models answer)"
    assert problems[2].startswith("line 4: messages[0].role: must be one of system, user, assistant")
    assert problems[3].startswith("line 5: unknown key(s) refrence")
    assert problems[4] == "line 7: tags.arc must be a string or a number, got list"
    assert len(problems) == 5
    ok = parse_scenarios(json.dumps(GOOD) + "\n", "f")
    assert (
        ok[0].id == "line-1"
        and ok[0].tags == {"arc": "conflict", "n": "3"}
        and ok[0].prompt == "We argue about money."
    )
    with pytest.raises(DatasetError, match="id 'x' is used by 2 scenarios"):
        parse_scenarios("\n".join(json.dumps({**GOOD, "id": "x"}) for _ in range(2)), "f")


def test_scenarios_from_a_path_and_from_a_loopback_url(tmp_path: Path) -> None:
    text = "\n".join(json.dumps({**GOOD, "id": f"s{i}", "reference": "ref"}) for i in range(3))
    (tmp_path / "s.jsonl").write_text(text)
    from_path = load_scenarios(path=str(tmp_path / "s.jsonl"), url=None, dest_dir=tmp_path / "dl")
    server = LoopbackServer(lambda m, p, h, b: (200, text.encode()) if p.startswith("/s.jsonl") else 404)
    try:
        from_url = load_scenarios(
            path=None, url=f"{server.base}/s.jsonl?sig=secret", dest_dir=tmp_path / "dl"
        )
        with pytest.raises(DatasetError) as err:
            load_scenarios(path=None, url=f"{server.base}/missing.jsonl?sig=secret", dest_dir=tmp_path / "dl")
    finally:
        server.close()
    assert [s.id for s in from_path] == [s.id for s in from_url] == ["s0", "s1", "s2"]
    assert str(err.value).startswith("dataset evaluation.scenarios_url: 1 problem(s)") and "HTTP 404" in str(
        err.value
    )
    assert "secret" not in str(err.value)
    with pytest.raises(DatasetError, match="(?s)evaluation.scenarios_path.*no such file"):
        load_scenarios(path=str(tmp_path / "nope.jsonl"), url=None, dest_dir=tmp_path)
    assert load_scenarios(path=None, url=None, dest_dir=tmp_path) is None


def test_held_out_scenarios_take_arcs_in_turn_and_several_turns_per_conversation() -> None:
    loaded = load_dataset(SAMPLE, "auto")
    arcs = {c.scaffolding.emotional_arc for c in loaded.conversations}
    picked = held_out_scenarios(loaded.conversations, len(arcs), seed=1)
    assert {s.tags["arc"] for s in picked} == arcs  # one per arc when asked for as many as there are arcs
    assert all(s.messages[-1].role == "user" and s.reference for s in picked)
    three = [c for c in loaded.conversations][:3]
    many = held_out_scenarios(three, 9, seed=1)
    assert len(many) == 9 and len({s.id for s in many}) == 9  # 9 distinct turns from 3 conversations
    assert held_out_scenarios(three, 9, seed=1) == many  # seeded
    assert held_out_scenarios(three, 9, seed=2) != many


# ----------------------------------------------------------------------------- end of turn


def reply(stopped: bool) -> Reply:
    return Reply(text="x", new_tokens=3 if stopped else 8, stopped=stopped, max_new_tokens=8)


def test_end_of_turn_warns_when_the_adapter_stops_less_often() -> None:
    base = [reply(True)] * 10
    fine = end_of_turn_check(base, [reply(True)] * 9 + [reply(False)], max_new_tokens=8)
    assert fine.adapted_share == 0.9 and fine.drop == pytest.approx(0.1) and fine.warning is None
    bad = end_of_turn_check(base, [reply(True)] * 8 + [reply(False)] * 2, max_new_tokens=8)
    assert bad.warning.startswith("end of turn: 8 of 10 adapted replies (80%) stopped before 8 new tokens")
    assert end_of_turn_check([], [], max_new_tokens=8) is None


def test_greedy_replies_know_whether_the_model_stopped(tiny_model, tokenizer) -> None:
    model = lora_model(tiny_model, checkpointing=False)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    prompts = [[{"role": "user", "content": "hello there"}]]
    push = {"logit": 0.0}

    def steer(module, args, output):  # the model's own output, <|eot_id|> pushed up or down
        output[..., eot] = push["logit"]
        return output

    handle = model.get_output_embeddings().register_forward_hook(steer)
    try:
        push["logit"] = 1e4  # <|eot_id|> wins every greedy step
        stops = greedy_replies(model, tokenizer, prompts, max_new_tokens=8)
        push["logit"] = -1e4  # <|eot_id|> never wins
        runs = greedy_replies(model, tokenizer, prompts, max_new_tokens=8)
    finally:
        handle.remove()
    assert stops == [Reply(text="", new_tokens=1, stopped=True, max_new_tokens=8)]
    assert runs[0].stopped is False and runs[0].new_tokens == 8 and runs[0].text


# ----------------------------------------------------------------------------- forgetting


def test_forgetting_probe_file_is_varied_and_fits(tokenizer) -> None:
    items = load_probe()
    assert len(items) >= 36 and len({i.id for i in items}) == len(items)
    assert {"fact", "arithmetic", "instruction", "code"} <= {i.kind for i in items}
    from lora_worker.runtime.evaluation.forgetting import _conversations

    examples, stats = build_examples(tokenizer, _conversations(items), 512)
    assert len(examples) == len(items) and stats.dropped_targets == 0


def test_forgetting_compare_states_and_applies_its_threshold() -> None:
    items = load_probe()[:4]
    before = loss({i.id: 2.0 for i in items})
    small = compare(items, before, loss({i.id: 2.08 for i in items}), seed=0, threshold=0.05)
    assert small.relative == pytest.approx(0.04) and small.warning is None
    big = compare(items, before, loss({i.id: 2.2 for i in items}), seed=0, threshold=0.05)
    assert big.warning.startswith("forgetting probe: loss on 4 general questions rose from 2.0000 to 2.2000")
    assert [r.kind for r in big.by_kind] == sorted({i.kind for i in items})


def test_forgetting_probe_on_the_tiny_model(tiny_model, tokenizer) -> None:
    model = lora_model(tiny_model, checkpointing=False)
    kw = dict(pad_id=tokenizer.pad_token_id, token_budget=2048, max_rows=8, max_seq_length=512, seed=0)
    identity = forgetting_probe(model, tokenizer, **kw)  # a fresh adapter (B = 0) is the base model
    assert identity.items == len(load_probe()) and identity.delta == 0.0 and identity.warning is None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    moved = forgetting_probe(model, tokenizer, **kw)
    assert moved.before == identity.before and moved.after != identity.after


# ----------------------------------------------------------------------------- the judge's setting


def test_resolve_judge() -> None:
    assert resolve_judge("auto", JudgeSettings(), CPU) == "none"
    assert resolve_judge("auto", JudgeSettings(), H100) == "self"
    assert resolve_judge("self", JudgeSettings(), CPU) == "self"
    with pytest.raises(JobInputError) as err:
        resolve_judge("openai", JudgeSettings(), CPU)
    assert err.value.problems == [
        "evaluation.judge: openai needs JUDGE_BASE_URL is not set on the worker",
        "evaluation.judge: openai needs JUDGE_MODEL is not set on the worker",
    ]


def test_estimate_judge_for_the_plan() -> None:
    convs = load_dataset(SAMPLE, "auto").conversations[:6]
    spec = parse_job_input(
        {"job_id": "j", "dataset_path": "x", "evaluation": {"num_scenarios": 12, "max_judge_minutes": 1.0}}
    )
    est = estimate_judge(spec, H100, JudgeSettings(), scenarios=None, eval_conversations=convs)
    assert est.kind == "self" and est.scenarios == 12
    assert est.judged < 12 and est.calls == 2 * est.judged and est.judge_seconds <= 60
    assert est.warnings[0].startswith(
        f"evaluation.max_judge_minutes 1 allows about {est.judged} of 12 scenarios"
    )
    cpu = estimate_judge(spec, CPU, JudgeSettings(), scenarios=None, eval_conversations=convs)
    assert (cpu.kind, cpu.judged, cpu.generation_seconds, cpu.judge_seconds) == ("none", 0, None, None)


# ----------------------------------------------------------------------------- gather_evidence


def perturbed(tiny_model):
    model = lora_model(tiny_model, checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return model


def measure(model, data, pad_id):
    kw = dict(token_budget=4096, max_rows=4)
    with model.disable_adapter():
        before = held_out_loss(model, data.eval, pad_id, **kw)
    return before, held_out_loss(model, data.eval, pad_id, **kw)


def longer_reply_wins(request: dict) -> str:
    """A scripted judge: the longer reply (by characters; A on a draw) wins."""
    a, b = replies_of(request)
    return f"Reason.\nWINNER: {'A' if len(a) >= len(b) else 'B'}"


def test_gather_evidence_with_an_openai_judge(tiny_model, tokenizer, tmp_path: Path) -> None:
    data = prepare_dataset(SAMPLE, tokenizer, max_seq_length=512, eval_fraction=0.25, max_eval=3, seed=3)
    spec = parse_job_input(
        {
            "job_id": "j",
            "dataset_path": str(SAMPLE),
            "evaluation": {"judge": "openai", "num_scenarios": 6, "max_new_tokens": 6},
        }
    )
    model = perturbed(tiny_model)
    before, after = measure(model, data, tokenizer.pad_token_id)
    warnings: list[str] = []
    with FakeOpenAI(longer_reply_wins) as server:
        settings = JudgeSettings(base_url=server.base, api_key="sk-secret-evidence", model="fake-judge")
        ev = gather_evidence(
            model, tokenizer, data, spec, settings, before, after, device=CPU, warnings=warnings, seed=3
        )
    assert len(ev.scenarios) == 6 and len(server.requests) == 12 and ev.judge.judged == 6
    for s in ev.scenarios:  # the judge's preference follows the script through both orders
        pair = next(p for p in ev.judge.pairs if p.scenario_id == s.id)
        expected = (
            "tie" if len(s.adapted) == len(s.base) else "adapted" if len(s.adapted) > len(s.base) else "base"
        )
        assert pair.preference == expected, (s.base, s.adapted, pair)
    assert ev.judge.summary.overall.wins == sum(len(s.adapted) > len(s.base) for s in ev.scenarios)
    assert set(ev.slices.tables) == {"arc", "persona", "topic"} and ev.slices.unavailable == []
    assert {s.tags["arc"] for s in ev.scenarios} == {
        c.scaffolding.emotional_arc for c in data.eval_conversations
    }
    assert ev.forgetting is not None and ev.end_of_turn.replies == 6
    assert ev.headline == ev.judge.headline and ev.headline.startswith(
        "Judged blind by fake-judge on 6 scenarios"
    )
    brief = ev.brief()
    assert (
        brief["judge"]["overall"]["n"] == 6
        and brief["scenarios"] == 6
        and brief["slices"] == ["arc", "persona", "topic"]
    )
    assert set(brief["forgetting"]) == {"before", "after", "relative", "warning"}
    assert json.loads(json.dumps(brief)) == brief
    dumped = ev.model_dump(mode="json")
    assert "sk-secret-evidence" not in json.dumps(dumped)
    paths = write_report(
        tmp_path / "report",
        {"job_id": "ev", "settings": {"seed": 3}, "evidence": dumped},
        human_key_path=tmp_path / "human_eval_key.json",
    )
    page = paths["html"].read_text()
    for section in ('id="judge"', 'id="slices"', 'id="scenarios"', 'id="forgetting"', 'id="end_of_turn"'):
        assert section in page
    assert paths["human_sheet_csv"].is_file() and paths["human_key"].parent == tmp_path


def test_gather_evidence_on_a_file_without_metadata(tiny_model, tokenizer, tmp_path: Path) -> None:
    lines = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"},
                      {"role": "user", "content": f"more {i}"}, {"role": "assistant", "content": f"sure {i}"}]}
        for i in range(8)
    ]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    data = prepare_dataset(path, tokenizer, max_seq_length=512, eval_fraction=0.25, max_eval=4, seed=0)
    spec = parse_job_input(
        {
            "job_id": "j",
            "dataset_path": str(path),
            "evaluation": {"num_scenarios": 10, "max_new_tokens": 4, "forgetting_probe": False},
        }
    )
    model = perturbed(tiny_model)
    before, after = measure(model, data, tokenizer.pad_token_id)
    warnings: list[str] = []
    ev = gather_evidence(
        model, tokenizer, data, spec, JudgeSettings(), before, after, device=CPU, warnings=warnings, seed=0
    )
    assert ev.judge is None and ev.judge_kind == "none" and ev.forgetting is None
    assert ev.slices.tables == {} and len(ev.slices.unavailable) == 3
    assert len(ev.scenarios) == 4 and all(s.tags == {} for s in ev.scenarios)  # 2 held out x 2 turns
    assert ev.notes == ["4 scenarios from held-out turns (all there are; 10 asked for)"]
    assert "no judge compared them" in ev.headline


def test_a_cancel_stops_evidence_early(tiny_model, tokenizer) -> None:
    data = prepare_dataset(SAMPLE, tokenizer, max_seq_length=1024, eval_fraction=0.25, max_eval=4, seed=3)
    spec = parse_job_input({"job_id": "j", "dataset_path": str(SAMPLE), "evaluation": {"judge": "self"}})
    ev = gather_evidence(
        perturbed(tiny_model), tokenizer, data, spec, JudgeSettings(), None, None,
        device=CPU, warnings=[], seed=0, should_stop=lambda: True,
    )  # fmt: skip
    assert ev.scenarios == [] and ev.judge is None and ev.forgetting is None
    assert ev.notes[-1] == "a cancel arrived: evidence gathering stopped early"
