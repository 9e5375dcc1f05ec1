"""Dataset ingestion: validation with places, folding, assistant-only labels, splitting, batching."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SAMPLE

from lora_worker.runtime.data.formats import (
    IGNORE_INDEX,
    Conversation,
    DatasetError,
    Example,
    Message,
    build_examples,
    collate,
    load_conversations,
    parse_conversations,
    plan_micro_batches,
    prepare_dataset,
    split_conversations,
)

FULL = REPO.parent / "shared" / "data" / "brightrun-242.json"


def brightrun(convs: list[list[dict]]) -> str:
    return json.dumps(
        {
            "training_file_metadata": {"format_spec": "brightrun-lora-v4"},
            "conversations": [
                {"conversation_metadata": {"conversation_id": f"c{i}"}, "training_pairs": pairs}
                for i, pairs in enumerate(convs)
            ],
        }
    )


def pairs_for(turns: list[tuple[str, str | None]], cid="c0", system="Be kind.") -> list[dict]:
    """Consistent pairs: each pair's history is the earlier turns (null targets filled in later)."""
    out, history = [], []
    for n, (user, target) in enumerate(turns, start=1):
        out.append(
            {
                "id": f"{cid}-t{n}",
                "conversation_id": cid,
                "turn_number": n,
                "system_prompt": system,
                "conversation_history": list(history),
                "current_user_input": user,
                "target_response": target,
            }
        )
        history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": target or f"reply {n}"},
        ]
    return out


def test_sample_file_loads_and_folds():
    convs, stats = load_conversations(SAMPLE)
    assert stats.format == "brightrun-lora-v4"
    assert (stats.conversations, stats.pairs, stats.skipped_null_targets) == (24, 156, 3)
    assert stats.folded_conversations == 24 and stats.unfolded_conversations == 0
    assert sum(m.train for c in convs for m in c.messages) == 156 - 3


@pytest.mark.skipif(not FULL.exists(), reason="shared full-size dataset not present")
def test_full_file_fold_ratio(tokenizer):
    prep = prepare_dataset(FULL, tokenizer, max_seq_length=2048)
    s = prep.summary
    assert s.conversations == 242 and s.pairs > 1500
    # Folding trains each conversation once instead of re-reading its prefix for every pair.
    assert s.tokens_unfolded > 2.5 * s.tokens_total


def test_null_target_turn_is_context_without_loss(tokenizer):
    text = brightrun(
        [pairs_for([("hello", None), ("how do I save?", "Start small."), ("and then?", "Keep going.")])]
    )
    # pairs_for fills the null target's reply as "reply 1" in later histories
    convs, stats = parse_conversations(text)
    assert stats.skipped_null_targets == 1
    (c,) = convs
    assert [m.role for m in c.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert [m.train for m in c.messages] == [False, False, False, False, True, False, True]
    (ex,), _ = build_examples(tokenizer, convs, 4096)
    trained = tokenizer.decode([t for t, y in zip(ex.input_ids, ex.labels, strict=True) if y != IGNORE_INDEX])
    assert "Start small." in trained and "Keep going." in trained
    assert "reply 1" not in trained and "hello" not in trained and "Be kind" not in trained
    assert trained.count("<|eot_id|>") == 2  # the model learns to stop after each target
    assert "assistant" not in trained  # role headers are prompt, not target


def test_inconsistent_pairs_fall_back_to_pair_by_pair():
    pairs = pairs_for([("a", "A"), ("b", "B")])
    pairs[1]["conversation_history"][1]["content"] = "something else"
    convs, stats = parse_conversations(brightrun([pairs]))
    assert stats.unfolded_conversations == 1
    assert [c.id for c in convs] == ["c0#t1", "c0#t2"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda p: p[1].update(target_response=5),
            "conversation c0 turn 2: target_response: must be a string or null",
        ),
        (lambda p: p[1].update(current_user_input=""), "conversation c0 turn 2: current_user_input"),
        (
            lambda p: p[1]["conversation_history"][0].update(role="bot"),
            "turn 2: conversation_history[0].role: unknown role 'bot'",
        ),
        (
            lambda p: p[2]["conversation_history"].__setitem__(1, {"role": "user", "content": "x"}),
            "turn 3: conversation_history[1].role: roles must alternate",
        ),
        (lambda p: p[1].pop("target_response"), "turn 2: target_response: missing"),
        (lambda p: p[0].update(turn_number="one"), "pair 0: turn_number: must be an integer"),
    ],
)
def test_broken_brightrun_names_the_place(mutate, expected):
    pairs = pairs_for([("a", "A"), ("b", "B"), ("c", "C")])
    mutate(pairs)
    with pytest.raises(DatasetError) as err:
        parse_conversations(brightrun([pairs]))
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_broken_top_level():
    for text, expected in [
        ("{not json", "not JSON"),
        ('{"x": 1}', "missing field 'conversations'"),
        ('{"conversations": {}}', "'conversations' must be a list"),
        (brightrun([pairs_for([("a", None)])]), "nothing to train on"),
    ]:
        with pytest.raises(DatasetError) as err:
            parse_conversations(text, "brightrun-lora-v4")
        assert expected in str(err.value)


def test_chat_jsonl(tmp_path, tokenizer):
    lines = [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1", "weight": 0},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"},
            ]
        },
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    convs, stats = load_conversations(f)
    assert stats.format == "chat-jsonl" and stats.conversations == 2
    assert [m.train for m in convs[1].messages] == [False, False, False, True]
    exs, _ = build_examples(tokenizer, convs, 4096)
    assert exs[1].input_ids[0] == tokenizer.bos_token_id


def test_broken_jsonl_names_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}\n'
        "not json\n"
        '{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "a"}]}\n'
        '{"messages": [{"role": "wizard", "content": "u"}]}\n'
        '{"messages": [{"role": "user", "content": "u"}]}\n'
    )
    with pytest.raises(DatasetError) as err:
        load_conversations(f, "chat-jsonl")
    text = str(err.value)
    assert "line 2: not JSON" in text
    assert "line 3: messages[1].role: roles must alternate" in text
    assert "line 4: messages[0].role: unknown role 'wizard'" in text
    assert "line 5: messages: the last message must be from the assistant" in text


def test_over_long_conversation_is_split_at_turns_never_cutting_a_target(tokenizer):
    turns = [(f"question {i} " * 5, f"answer {i} " * 20) for i in range(6)]
    convs, _ = parse_conversations(brightrun([pairs_for(turns)]))
    whole, _ = build_examples(tokenizer, convs, 100_000)
    limit = len(whole[0].input_ids) // 3
    exs, stats = build_examples(tokenizer, convs, limit)
    assert len(exs) > 1 and stats.truncated >= 1 and stats.dropped_targets == 0
    assert all(len(e.input_ids) <= limit for e in exs)
    # every target appears trained exactly once, whole
    trained = [
        tokenizer.decode([t for t, y in zip(e.input_ids, e.labels, strict=True) if y != -100]) for e in exs
    ]
    for i in range(6):
        assert sum(t.count((f"answer {i} " * 20).strip()) for t in trained) == 1
    assert stats.trainable_tokens == whole[0].trainable_tokens
    # a chunk that starts later keeps the system prompt
    assert all(
        tokenizer.decode(e.input_ids[:12]).startswith("<|begin_of_text|><|start_header_id|>system")
        for e in exs
    )


def test_target_longer_than_the_limit_is_dropped_and_counted(tokenizer):
    convs, _ = parse_conversations(brightrun([pairs_for([("q", "long answer " * 200), ("q2", "ok")])]))
    exs, stats = build_examples(tokenizer, convs, 128)
    assert stats.dropped_targets == 1
    assert all(len(e.input_ids) <= 128 for e in exs)


def test_split_is_by_conversation_and_reproducible():
    convs, _ = load_conversations(SAMPLE, fold=False)  # pair-by-pair ids look like '<cid>#t<n>'
    a_train, a_eval = split_conversations(convs, eval_fraction=0.2, max_eval=10, seed=7)
    b_train, b_eval = split_conversations(convs, eval_fraction=0.2, max_eval=10, seed=7)
    assert [c.id for c in a_eval] == [c.id for c in b_eval]
    held = {c.id.split("#t")[0] for c in a_eval}
    assert held and not held & {c.id.split("#t")[0] for c in a_train}
    _, c_eval = split_conversations(convs, eval_fraction=0.2, max_eval=10, seed=8)
    assert {c.id for c in c_eval} != {c.id for c in a_eval}


def test_micro_batches_respect_budget_and_rows():
    lengths = [100, 900, 250, 240, 1000, 60, 500, 510]
    plan = plan_micro_batches(lengths, token_budget=1024, max_rows=4)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1024


def _loss_per_token(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits.float()
    lp = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return lp


@pytest.fixture(scope="module")
def nf4_model(tiny_model):
    from lora_worker.runtime.model.load import load_base_model

    return load_base_model(tiny_model)


def test_padded_rows_do_not_attend_to_each_other(nf4_model, tokenizer):
    """Isolation: an example's per-token loss is the same alone or in a right-padded micro-batch."""
    convs, _ = load_conversations(SAMPLE)
    exs, _ = build_examples(tokenizer, convs[:3], 512)
    exs = exs[:3]
    pad = tokenizer.pad_token_id
    together = _loss_per_token(nf4_model, collate(exs, pad))
    for r, e in enumerate(exs):
        alone = _loss_per_token(nf4_model, collate([e], pad))
        n = len(e.input_ids) - 1
        assert torch.allclose(together[r, :n], alone[0, :n], atol=2e-2), r
        assert (together[r, n:] == 0).all()  # padding carries no loss


def test_folded_loss_equals_pair_by_pair_loss(nf4_model, tokenizer):
    """Same target tokens, same contexts: folding changes the cost, not what is learned."""
    convs, _ = load_conversations(SAMPLE, fold=True)
    pairs, _ = load_conversations(SAMPLE, fold=False)
    cid = convs[0].id
    folded, _ = build_examples(tokenizer, [convs[0]], 100_000)
    unfolded, _ = build_examples(tokenizer, [c for c in pairs if c.id.startswith(cid + "#")], 100_000)
    pad = tokenizer.pad_token_id

    def target_losses(e):
        per_token = _loss_per_token(nf4_model, collate([e], pad))[0][: len(e.labels) - 1]
        return per_token[torch.tensor(e.labels[1:]) != IGNORE_INDEX]

    f_targets = target_losses(folded[0])
    u_targets = torch.cat([target_losses(e) for e in unfolded])
    assert f_targets.numel() == u_targets.numel() == folded[0].trainable_tokens
    # Per-token losses match; the folded mean weighs every target token once, like the pairs' token mean.
    assert torch.allclose(f_targets, u_targets, atol=5e-2)
    assert abs(f_targets.mean().item() - u_targets.mean().item()) < 1e-2


def test_validate_cli(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "lora_worker", "validate", str(SAMPLE), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["ok"] and summary["pairs"] == 156 and summary["skipped_null_targets"] == 3
    assert summary["tokens_unfolded"] > summary["tokens_total"] > summary["trainable_tokens"] > 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"conversations": [{"training_pairs": [{"turn_number": 1, "target_response": 3}]}]}')
    res = subprocess.run(
        [sys.executable, "-m", "lora_worker", "validate", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 1
    assert (
        "turn 1: current_user_input" in res.stderr
        and "target_response: must be a string or null" in res.stderr
    )


def test_packed_row_isolates_examples(nf4_model, tokenizer):
    """`packing: packed`: examples back to back in one row; each one's per-token loss is as alone."""
    from lora_worker.runtime.data.formats import collate_packed, plan_packed

    convs, _ = load_conversations(SAMPLE)
    exs, _ = build_examples(tokenizer, convs[:3], 512)
    exs = exs[:3]
    batch = collate_packed(exs)
    with torch.no_grad():
        logits = nf4_model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        ).logits.float()
    packed = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )[0]
    at = 0
    for e in exs:
        n = len(e.input_ids)
        alone = _loss_per_token(nf4_model, collate([e], tokenizer.pad_token_id))[0, : n - 1]
        assert torch.allclose(packed[at : at + n - 1], alone, atol=2e-2)
        at += n
    plan = plan_packed([500, 300, 200, 900, 100], token_budget=1000)
    assert sorted(i for b in plan for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([500, 300, 200, 900, 100][i] for i in b) <= 1000 for b in plan) and len(plan) == 2


def test_cut_first_turn_without_system_keeps_bos(tokenizer):
    convo = Conversation(
        "c", (Message("user", "word " * 300), Message("assistant", "short answer", train=True))
    )
    (ex,), stats = build_examples(tokenizer, [convo], 64)
    assert stats.truncated == 1 and len(ex.input_ids) <= 64
    assert ex.input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode([t for t, y in zip(ex.input_ids, ex.labels, strict=True) if y != -100]) == (
        "short answer<|eot_id|>"
    )


def test_padding_fraction_counts_each_micro_batch_as_trained():
    from lora_worker.runtime.training.trainer import make_schedule, padding_fraction, split_schedule

    exs = [Example("c", tuple(range(n)), tuple(range(n))) for n in (10, 10, 6, 2)]
    plan = [[0, 1], [2, 3]]  # 20 real of 20, then 8 real of 12
    assert padding_fraction(exs, plan) == round(1 - 28 / 32, 4)
    # every epoch and a split after an OOM train the same positions: the same share
    assert padding_fraction(exs, make_schedule(plan, 3, seed=1)) == padding_fraction(exs, plan)
    assert padding_fraction(exs, split_schedule(plan)) == 0.0  # one row each: no padding left
