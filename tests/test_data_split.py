"""The held-out split (whole conversations, stratified by arc and persona, seeded) and the samples."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import SAMPLE
from data_builders import FULL, brightrun, pairs_for

from lora_worker.runtime.data import load_dataset, parse_dataset, pick_samples, split_conversations
from lora_worker.runtime.data.split import held_out_count


def test_split_is_by_conversation_and_reproducible():
    convs = load_dataset(SAMPLE, fold=False).conversations  # pair-by-pair ids look like '<cid>#t<n>'
    a_train, a_eval = split_conversations(convs, eval_fraction=0.2, max_eval=10, seed=7)
    b_train, b_eval = split_conversations(convs, eval_fraction=0.2, max_eval=10, seed=7)
    assert [c.id for c in a_eval] == [c.id for c in b_eval]
    held = {c.group for c in a_eval}
    assert len(held) == 5 and not held & {c.group for c in a_train}
    assert len(a_train) + len(a_eval) == len(convs)
    _, c_eval = split_conversations(convs, eval_fraction=0.2, max_eval=10, seed=8)
    assert {c.id for c in c_eval} != {c.id for c in a_eval}


def test_held_out_count():
    assert held_out_count(242, eval_fraction=0.1, max_eval=24) == 24
    assert held_out_count(5, eval_fraction=0.1, max_eval=24) == 1  # at least one when asked for any
    assert held_out_count(2, eval_fraction=0.9, max_eval=24) == 1  # never every conversation
    assert held_out_count(1, eval_fraction=0.5, max_eval=24) == 0
    assert held_out_count(100, eval_fraction=0.0, max_eval=24) == 0


@pytest.mark.skipif(not FULL.exists(), reason="shared full-size dataset not present")
def test_stratified_split_holds_out_every_arc_and_samples_cover_them():
    convs = load_dataset(FULL).conversations
    arcs = {c.scaffolding.emotional_arc for c in convs}
    assert len(arcs) == 7
    train, held = split_conversations(convs, eval_fraction=0.1, max_eval=24, seed=42)
    assert len(held) == 24
    held_arcs = Counter(c.scaffolding.emotional_arc for c in held)
    assert set(held_arcs) == arcs
    # proportional: the largest arc (42 of 242) gets about 4 of 24, the smallest (25) about 2
    assert max(held_arcs.values()) <= 5 and min(held_arcs.values()) >= 2
    assert {c.scaffolding.persona for c in held} == {c.scaffolding.persona for c in convs}
    assert not {c.id for c in held} & {c.id for c in train}
    again = split_conversations(convs, eval_fraction=0.1, max_eval=24, seed=42)[1]
    assert [c.id for c in again] == [c.id for c in held]

    samples = pick_samples(held, 10, seed=42)
    assert len(samples) == 10
    assert {s.scaffolding.emotional_arc for s in samples} == arcs
    assert pick_samples(held, 10, seed=42) == samples
    for s in samples:
        assert s.prompt[-1].role == "user" and s.reference
        assert s.chat()[-1] == {"role": "user", "content": s.prompt[-1].content}
    assert len({s.conversation_id for s in samples}) == 10


def test_samples_cover_every_arc_when_there_are_enough():
    arcs = ["fear", "grief", "shame", "conflict"]
    scaff = [{"emotional_arc_key": arcs[i % 4] if i < 12 else "fear", "persona_key": "p"} for i in range(20)]
    text = brightrun(
        [pairs_for([("q", "a"), ("q2", "b")], cid=f"c{i}") for i in range(20)], scaffolding=scaff
    )
    convs = parse_dataset(text).conversations
    for n in (4, 6):
        assert {s.scaffolding.emotional_arc for s in pick_samples(convs, n, seed=3)} == set(arcs)
    assert len({s.scaffolding.emotional_arc for s in pick_samples(convs, 3, seed=3)}) == 3


def test_split_without_metadata_is_a_seeded_shuffle():
    text = "".join(
        f'{{"id": "x{i}", "messages": [{{"role": "user", "content": "u"}}, {{"role": "assistant", "content": "a"}}]}}\n'
        for i in range(30)
    )
    convs = parse_dataset(text).conversations
    _, held = split_conversations(convs, eval_fraction=0.2, max_eval=24, seed=5)
    assert len(held) == 6
    assert [c.id for c in split_conversations(convs, eval_fraction=0.2, max_eval=24, seed=5)[1]] == [
        c.id for c in held
    ]
    samples = pick_samples(held, 3, seed=5)
    assert len(samples) == 3 and all(s.scaffolding is None for s in samples)


def test_pair_by_pair_fallbacks_stay_together_in_a_stratified_split():
    scaff = [{"emotional_arc_key": f"arc{i % 3}", "persona_key": f"p{i % 2}"} for i in range(12)]
    convs_raw = []
    for i in range(12):
        pairs = pairs_for([("a", "A"), ("b", "B"), ("c", "C")], cid=f"c{i}")
        if i % 2:
            pairs[2]["conversation_history"][1]["content"] = "disagrees"  # trained pair by pair
        convs_raw.append(pairs)
    convs = parse_dataset(brightrun(convs_raw, scaffolding=scaff)).conversations
    assert any("#t" in c.id for c in convs)
    train, held = split_conversations(convs, eval_fraction=0.25, max_eval=24, seed=0)
    assert {c.group for c in held}.isdisjoint({c.group for c in train})
    assert {c.scaffolding.emotional_arc for c in held} == {"arc0", "arc1", "arc2"}
