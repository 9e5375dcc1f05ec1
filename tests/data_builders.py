"""Small dataset builders shared by the data tests (brightrun files written as a studio export would)."""

from __future__ import annotations

import json

from conftest import REPO

FULL = REPO.parent / "shared" / "data" / "brightrun-242.json"


def brightrun(convs: list[list[dict]], *, scaffolding: list[dict] | None = None, **top) -> str:
    """A brightrun-lora-v4 file; conversation i gets id c<i> and scaffolding[i] when given."""
    out = []
    for i, pairs in enumerate(convs):
        meta = {"conversation_id": f"c{i}"}
        if scaffolding is not None:
            meta["scaffolding"] = scaffolding[i]
        out.append({"conversation_metadata": meta, "training_pairs": pairs})
    return json.dumps(
        {"training_file_metadata": {"format_spec": "brightrun-lora-v4"}, **top, "conversations": out}
    )


def pairs_for(turns: list[tuple[str, str | None]], cid="c0", system="Be kind.", quality=None) -> list[dict]:
    """Consistent pairs: each pair's history is the earlier turns (null targets filled in later);
    quality[i] becomes turn i's training_metadata.quality_score when given."""
    out, history = [], []
    for n, (user, target) in enumerate(turns, start=1):
        pair = {
            "id": f"{cid}-t{n}",
            "conversation_id": cid,
            "turn_number": n,
            "system_prompt": system,
            "conversation_history": list(history),
            "current_user_input": user,
            "target_response": target,
        }
        if quality is not None:
            pair["training_metadata"] = {"quality_score": quality[n - 1]}
        out.append(pair)
        history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": target or f"reply {n}"},
        ]
    return out


def trained_text(tokenizer, example) -> str:
    """The decoded labelled tokens of one example."""
    return tokenizer.decode([t for t, y in zip(example.input_ids, example.labels, strict=True) if y != -100])


LONG_SYSTEM = "You are a warm, steady financial planner. Validate first, then one next step. " * 12


def system_heavy_dataset() -> str:
    """In tiny-tokenizer tokens: most conversations have a system prompt of ~400 and targets of ~150-300, each fitting
    max_seq_length 512 alone but not after the system prompt; two short-prompt conversations fit;
    one target is too long even alone."""
    convs = []
    for i in range(8):
        turns = [
            (
                f"What should I do first about {i}?",
                "Let's separate what we know from what we fear. " * (12 + 4 * k),
            )
            for k in range(3)
        ]
        convs.append(pairs_for(turns, cid=f"c{i}", system=LONG_SYSTEM))
    for i in range(8, 10):
        convs.append(
            pairs_for([("Is it too late?", "No. Small steps compound.")], cid=f"c{i}", system="Be kind.")
        )
    convs.append(
        pairs_for(
            [("Tell me everything.", "Retirement savings matter. " * 140)], cid="c10", system="Be kind."
        )
    )
    return brightrun(convs)
