"""Conversations to examples: labels from the chat template, splitting at turns, and every dropped,
cut or split target counted by cause, with the max_seq_length that keeps them."""

from __future__ import annotations

import pytest
from data_builders import LONG_SYSTEM, brightrun, pairs_for, system_heavy_dataset, trained_text

from lora_worker.runtime.data import (
    Conversation,
    DatasetError,
    Message,
    PreprocessingCancelled,
    build_examples,
    check_data_loss,
    parse_dataset,
    prepare_dataset,
)
from lora_worker.tools.tiny_model import LLAMA3_CHAT_TEMPLATE, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def convs_of(text: str) -> list[Conversation]:
    return list(parse_dataset(text).conversations)


def test_labels_cover_targets_and_their_end_of_turn_only(tok):
    text = brightrun(
        [pairs_for([("hello", None), ("how do I save?", "Start small."), ("and then?", "Keep going.")])]
    )
    (ex,), stats = build_examples(tok, convs_of(text), 4096)
    trained = trained_text(tok, ex)
    assert "Start small." in trained and "Keep going." in trained
    assert "reply 1" not in trained and "hello" not in trained and "Be kind" not in trained
    assert trained.count("<|eot_id|>") == 2  # the model learns to stop after each target
    assert "assistant" not in trained  # role headers are prompt, not target
    assert stats.targets == 2 and stats.target_tokens == stats.trainable_tokens == ex.trainable_tokens


def test_chat_jsonl_example_starts_with_bos(tok):
    text = '{"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}]}\n'
    (ex,), _ = build_examples(tok, convs_of(text), 4096)
    assert ex.input_ids[0] == tok.bos_token_id


def test_over_long_conversation_is_split_at_turns_never_cutting_a_target(tok):
    turns = [(f"question {i} " * 5, f"answer {i} " * 20) for i in range(6)]
    convs = convs_of(brightrun([pairs_for(turns)]))
    whole, _ = build_examples(tok, convs, 100_000)
    limit = len(whole[0].input_ids) // 3
    exs, stats = build_examples(tok, convs, limit)
    assert len(exs) > 1 and stats.conversations_split == 1 and stats.dropped_targets == 0
    assert stats.examples_missing_earlier_turns >= 1
    assert all(len(e.input_ids) <= limit for e in exs)
    trained = [trained_text(tok, e) for e in exs]
    for i in range(6):  # every target appears trained exactly once, whole
        assert sum(t.count((f"answer {i} " * 20).strip()) for t in trained) == 1
    assert stats.trainable_tokens == whole[0].trainable_tokens == stats.target_tokens
    # a chunk that starts later keeps the system prompt
    assert all(
        tok.decode(e.input_ids[:12]).startswith("<|begin_of_text|><|start_header_id|>system") for e in exs
    )


def test_cut_first_turn_without_system_keeps_bos(tok):
    convo = Conversation(
        "c", (Message("user", "word " * 300), Message("assistant", "short answer", train=True))
    )
    (ex,), stats = build_examples(tok, [convo], 64)
    assert stats.context_cut_targets == 1 and len(ex.input_ids) <= 64
    assert ex.input_ids[0] == tok.bos_token_id
    assert trained_text(tok, ex) == "short answer<|eot_id|>"


def test_target_longer_than_the_limit_alone_is_dropped_with_its_cause(tok):
    convs = convs_of(brightrun([pairs_for([("q", "long answer " * 200), ("q2", "ok")])]))
    exs, stats = build_examples(tok, convs, 128)
    assert stats.dropped_target_too_long == 1 and stats.dropped_system_plus_target_too_long == 0
    assert all(len(e.input_ids) <= 128 for e in exs)
    assert stats.dropped_target_tokens + stats.trainable_tokens == stats.target_tokens
    assert stats.dropped_in == ["c0"]


# ----------------------------------------------------------------------------- the data-loss refusal


def test_dropped_targets_are_counted_by_cause_with_the_limit_that_keeps_them(tok, tmp_path):
    f = tmp_path / "system-heavy.json"
    f.write_text(system_heavy_dataset())
    assert len(tok(LONG_SYSTEM)["input_ids"]) > 300  # the premise: the system prompt alone is long
    summary = prepare_dataset(f, tok, max_seq_length=512, eval_fraction=0.2, seed=1).summary
    length = summary.length
    assert length.targets == 8 * 3 + 2 + 1
    assert length.dropped_system_plus_target_too_long == 24  # the targets fit alone, not after the prompt
    assert length.dropped_target_too_long == 1
    assert length.dropped_targets == 25 and length.dropped_token_share > 0.8
    assert length.dropped_target_tokens < length.target_tokens
    # the fix is computed from the data: the smallest limit that keeps every target with its user turn
    keep = length.keep_all_max_seq_length
    assert keep is not None and keep > 512
    at_keep = prepare_dataset(f, tok, max_seq_length=keep, eval_fraction=0.2, seed=1).summary.length
    below = prepare_dataset(f, tok, max_seq_length=keep - 1, eval_fraction=0.2, seed=1).summary.length
    assert at_keep.dropped_targets == 0
    # one below it, some target no longer fits with its whole user turn: its context is cut (or it is dropped)
    assert below.dropped_targets + below.context_cut_targets > at_keep.context_cut_targets
    (warning,) = [w for w in summary.warnings if "dropped" in w]
    assert "25 of 27 targets dropped at max_seq_length 512" in warning
    assert "24 fit alone but not after the system prompt" in warning
    assert "1 longer than max_seq_length on their own" in warning
    assert f"max_seq_length {keep} keeps them all" in warning
    assert "longer than max_seq_length alone" not in warning  # the old, wrong label

    with pytest.raises(DatasetError) as err:
        check_data_loss(summary, 0.2)
    text = str(err.value)
    assert "25 of 27 targets" in text and f"raise max_seq_length to {keep}" in text and "20%" in text
    check_data_loss(summary, 1.0)  # the share raised: accepted


def test_summary_is_typed_and_serializable(tok, tmp_path):
    f = tmp_path / "d.json"
    f.write_text(system_heavy_dataset())
    summary = prepare_dataset(f, tok, max_seq_length=4096).summary
    d = summary.as_dict()
    assert d["length"]["dropped_targets"] == 0 and d["length"]["keep_all_max_seq_length"] is None
    assert type(summary).model_validate(d) == summary
    with pytest.raises(ValueError):
        summary.examples = 3  # frozen
    schema = type(summary).model_json_schema()
    assert all(f.get("description") for f in schema["properties"].values())


def test_nothing_left_to_train_names_the_cause(tok):
    text = brightrun([pairs_for([("q", "long answer " * 200)], cid=f"c{i}") for i in range(3)])
    loaded = parse_dataset(text)
    with pytest.raises(DatasetError) as err:
        prepare_dataset(loaded, tok, max_seq_length=128)
    assert "nothing to train on" in str(err.value) and "longer than max_seq_length on their own" in str(
        err.value
    )


# ----------------------------------------------------------------------------- end of turn, progress, cancel


def test_template_that_drops_the_end_of_turn_token_is_refused(tok):
    broken = build_tokenizer()
    broken.chat_template = LLAMA3_CHAT_TEMPLATE.replace("+ '<|eot_id|>'", "+ '\\n\\n'")
    convs = convs_of(brightrun([pairs_for([("q", "A short answer.")])]))
    with pytest.raises(DatasetError) as err:
        build_examples(broken, convs, 512)
    assert "conversation c0 message 2" in str(err.value) and "end-of-turn token ('<|eot_id|>')" in str(
        err.value
    )
    # a template that puts a newline after the end-of-turn token still ends the turn
    newline = build_tokenizer()
    newline.chat_template = LLAMA3_CHAT_TEMPLATE.replace("+ '<|eot_id|>'", "+ '<|eot_id|>\\n'")
    (ex,), _ = build_examples(newline, convs, 512)
    assert "<|eot_id|>" in trained_text(newline, ex)


def test_tokenizing_reports_progress_and_honours_cancel(tok):
    convs = convs_of(brightrun([pairs_for([("q", "a")], cid=f"c{i}") for i in range(600)]))
    seen: list[tuple[int, int]] = []
    build_examples(tok, convs, 512, on_progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 600) and seen[-1] == (600, 600) and len(seen) >= 4

    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 50

    with pytest.raises(PreprocessingCancelled) as err:
        build_examples(tok, convs, 512, should_stop=stop)
    assert err.value.stage == "tokenizing" and err.value.done == 50 and err.value.total == 600


def test_prepare_reports_progress_over_train_and_held_out(tok):
    text = brightrun([pairs_for([("q", "a")], cid=f"c{i}") for i in range(50)])
    seen: list[tuple[int, int]] = []
    prep = prepare_dataset(
        parse_dataset(text), tok, eval_fraction=0.2, on_progress=lambda d, t: seen.append((d, t))
    )
    assert prep.summary.eval_conversations == 10
    assert {t for _, t in seen} == {50} and seen[-1] == (50, 50)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
