"""Dataset files to conversations: validation with places, folding, metadata, the quality filter,
and files a user may hand in by mistake (directories, binaries, BOMs, deep nesting)."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE
from data_builders import FULL, brightrun, pairs_for

from lora_worker.runtime.data import DatasetError, PreprocessingCancelled, load_dataset, parse_dataset


def test_sample_file_loads_and_folds():
    loaded = load_dataset(SAMPLE)
    stats = loaded.stats
    assert stats.format == "brightrun-lora-v4"
    assert (stats.conversations, stats.pairs, stats.skipped_null_targets) == (24, 156, 3)
    assert stats.folded_conversations == 24 and stats.unfolded_conversations == 0
    assert sum(c.targets for c in loaded.conversations) == 156 - 3


def test_null_target_turn_is_context_without_loss():
    text = brightrun(
        [pairs_for([("hello", None), ("how do I save?", "Start small."), ("and then?", "Keep going.")])]
    )
    loaded = parse_dataset(text)
    assert loaded.stats.skipped_null_targets == 1
    (c,) = loaded.conversations
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
    assert c.messages[2].content == "reply 1"  # the null target's reply, known from later histories


def test_inconsistent_pairs_fall_back_to_pair_by_pair():
    pairs = pairs_for([("a", "A"), ("b", "B")])
    pairs[1]["conversation_history"][1]["content"] = "something else"
    loaded = parse_dataset(brightrun([pairs]))
    assert loaded.stats.unfolded_conversations == 1
    assert [c.id for c in loaded.conversations] == ["c0#t1", "c0#t2"]
    # each pair keeps its own history: the second trains after "something else"
    assert [m.content for m in loaded.conversations[1].messages] == [
        "Be kind.",
        "a",
        "something else",
        "b",
        "B",
    ]


def test_later_pair_with_shorter_history_trains_pair_by_pair():
    """A later pair whose history is shorter than the earlier pairs imply (a re-sent first turn)
    used to crash folding with IndexError; it trains pair by pair, each pair as written."""
    pairs = pairs_for([("hi", "A"), ("q", "B")])
    pairs.append({**pairs[0], "id": "c0-t3", "turn_number": 3})  # turn 3 repeats turn 1 with no history
    loaded = parse_dataset(brightrun([pairs]))
    assert loaded.stats.unfolded_conversations == 1
    assert [c.id for c in loaded.conversations] == ["c0#t1", "c0#t2", "c0#t3"]
    assert [m.content for m in loaded.conversations[2].messages] == ["Be kind.", "hi", "A"]


def test_later_pair_with_longer_history_trains_pair_by_pair():
    pairs = pairs_for([("a", "A"), ("b", "B"), ("c", "C")])
    extra = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    pairs[2]["conversation_history"] = extra + pairs[2]["conversation_history"]
    loaded = parse_dataset(brightrun([pairs]))
    assert loaded.stats.unfolded_conversations == 1
    assert len(loaded.conversations) == 3
    assert [m.content for m in loaded.conversations[2].messages][1:3] == ["x", "y"]


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
        (
            lambda p: p[1].update(training_metadata={"quality_score": "high"}),
            "conversation c0 turn 2: training_metadata.quality_score: must be a number, got str",
        ),
        (
            lambda p: p[0].update(emotional_context={"detected_emotions": {"intensity": "very"}}),
            "turn 1: emotional_context.detected_emotions.intensity: must be a number",
        ),
    ],
)
def test_broken_brightrun_names_the_place(mutate, expected):
    pairs = pairs_for([("a", "A"), ("b", "B"), ("c", "C")])
    mutate(pairs)
    with pytest.raises(DatasetError) as err:
        parse_dataset(brightrun([pairs]))
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_broken_top_level():
    for text, expected in [
        ("{not json", "not JSON"),
        ('{"x": 1}', "missing field 'conversations'"),
        ('{"conversations": {}}', "'conversations' must be a list"),
        (brightrun([pairs_for([("a", None)])]), "nothing to train on"),
    ]:
        with pytest.raises(DatasetError) as err:
            parse_dataset(text, "brightrun-lora-v4")
        assert expected in str(err.value)


def test_chat_jsonl_weights_and_no_metadata_note(tmp_path):
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
    loaded = load_dataset(f)
    assert loaded.format == "chat-jsonl" and loaded.stats.conversations == 2
    assert [m.train for m in loaded.conversations[1].messages] == [False, False, False, True]
    assert not loaded.has_metadata and loaded.profile is None
    assert any("no conversation metadata" in n for n in loaded.notes)


def test_broken_jsonl_names_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}\n'
        "not json\n"
        '{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "a"}]}\n'
        '{"messages": [{"role": "wizard", "content": "u"}]}\n'
        '{"messages": [{"role": "user", "content": "u"}]}\n' + "[" * 100_000 + "\n"
    )
    with pytest.raises(DatasetError) as err:
        load_dataset(f, "chat-jsonl")
    text = str(err.value)
    assert "line 2: not JSON" in text
    assert "line 3: messages[1].role: roles must alternate" in text
    assert "line 4: messages[0].role: unknown role 'wizard'" in text
    assert "line 5: messages: the last message must be from the assistant" in text
    assert "line 6: JSON nested too deeply" in text


# ----------------------------------------------------------------------------- files handed in by mistake


def test_byte_order_mark_is_accepted_in_both_formats(tmp_path):
    bom = "\ufeff"
    f = tmp_path / "export.json"
    f.write_text(bom + SAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_dataset(f).stats.conversations == 24
    g = tmp_path / "chat.jsonl"
    g.write_text(
        bom + '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}\n'
    )
    loaded = load_dataset(g)
    assert loaded.format == "chat-jsonl" and loaded.stats.conversations == 1


def test_deeply_nested_json_is_refused_with_a_message(tmp_path):
    f = tmp_path / "deep.json"
    f.write_text('{"conversations": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(DatasetError) as err:
        load_dataset(f)
    assert "nested too deeply" in str(err.value)


def test_directory_and_binary_file_are_refused_with_a_message(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    assert "is a directory" in str(err.value)
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(range(256)))
    with pytest.raises(DatasetError) as err:
        load_dataset(binary)
    assert "binary file" in str(err.value)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"messages": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(DatasetError) as err:
        load_dataset(latin1)
    assert "not UTF-8" in str(err.value)
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "missing.json")
    assert "file not found" in str(err.value)


def test_conversation_count_cap():
    text = brightrun([pairs_for([("a", "A")], cid=f"c{i}") for i in range(5)])
    with pytest.raises(DatasetError) as err:
        parse_dataset(text, max_conversations=4)
    assert "5 conversations, more than the limit of 4" in str(err.value)
    jsonl = '{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}\n' * 5
    with pytest.raises(DatasetError):
        parse_dataset(jsonl, max_conversations=4)


# ----------------------------------------------------------------------------- metadata


@pytest.mark.skipif(not FULL.exists(), reason="shared full-size dataset not present")
def test_metadata_is_carried_through():
    loaded = load_dataset(FULL)
    assert loaded.info is not None and loaded.info.version == "4.0.0"
    assert loaded.info.name == "Synthetic sample 242 conversations"
    profile = loaded.profile
    assert profile is not None and profile.name == "Elena Morales, CFP"
    assert "Money is emotional before it is mathematical" in profile.philosophy
    assert profile.tone == "warm, steady, encouraging" and "jargon" in profile.avoid
    assert "Elena Morales" in profile.describe()
    c = loaded.conversations[0]
    assert c.scaffolding is not None
    assert (c.scaffolding.persona, c.scaffolding.emotional_arc, c.scaffolding.topic) == (
        "overwhelmed_avoider",
        "excitement_to_grounded_planning",
        "windfall",
    )
    raw = json.loads(FULL.read_text())["conversations"][0]["training_pairs"]
    targets = [m for m in c.messages if m.train]
    by_turn = {m.meta.turn: m.meta for m in targets}
    for pair in raw:
        if pair["target_response"] is None:
            continue
        meta = by_turn[pair["turn_number"]]
        tm = pair["training_metadata"]
        assert meta.quality_score == tm["quality_score"]
        assert meta.difficulty_level == tm["difficulty_level"]
        assert list(meta.demonstrates_skills) == tm["demonstrates_skills"]
        assert meta.emotions.primary == pair["emotional_context"]["detected_emotions"]["primary"]


def test_quality_filter_keeps_low_rated_targets_as_context():
    pairs = pairs_for([("a", "A"), ("b", "B"), ("c", "C")], quality=[5, 2, 4])
    off = parse_dataset(brightrun([pairs]))
    assert off.conversations[0].targets == 3 and off.stats.quality_filtered_targets == 0
    on = parse_dataset(brightrun([pairs]), min_quality_score=3.5)
    (c,) = on.conversations
    assert on.stats.quality_filtered_targets == 1
    assert [(m.content, m.train) for m in c.messages if m.role == "assistant"] == [
        ("A", True),
        ("B", False),
        ("C", True),
    ]
    # pair by pair: the low-rated pair is not trained at all, its reply still context for turn 3
    by_pair = parse_dataset(brightrun([pairs]), fold=False, min_quality_score=3.5)
    assert [x.id for x in by_pair.conversations] == ["c0#t1", "c0#t3"]
    assert "B" in [m.content for m in by_pair.conversations[1].messages]
    with pytest.raises(DatasetError) as err:
        parse_dataset(brightrun([pairs]), min_quality_score=6)
    assert "below min_quality_score" in str(err.value)


def test_loading_reports_progress_and_honours_cancel():
    text = brightrun([pairs_for([("a", "A")], cid=f"c{i}") for i in range(1000)])
    seen: list[tuple[int, int]] = []
    parse_dataset(text, on_progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 1000) and seen[-1] == (1000, 1000) and len(seen) > 2

    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 300

    with pytest.raises(PreprocessingCancelled) as err:
        parse_dataset(text, should_stop=stop)
    assert err.value.stage == "loading" and err.value.done == 300
