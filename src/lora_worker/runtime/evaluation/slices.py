"""Held-out loss before and after training, per conversation and per slice (emotional arc,
persona, topic), each slice's mean change with a seeded bootstrap 95 % interval.

Units are source conversations: the pair-by-pair fallbacks of one conversation (`<id>#t<n>`) are
averaged into one value, so a conversation split that way does not count several times in an
interval. Losses are nats per trained token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.data.conversation import Conversation, Scaffolding
from lora_worker.runtime.data.split import UNKNOWN
from lora_worker.runtime.evaluation.loss import HeldOutLoss
from lora_worker.runtime.evaluation.stats import bootstrap_mean_interval

# slice name -> (label for people, how to read it from a conversation's scaffolding)
SLICE_KEYS: dict[str, tuple[str, Callable[[Scaffolding], str | None]]] = {
    "arc": ("emotional arc", lambda s: s.emotional_arc),
    "persona": ("persona", lambda s: s.persona),
    "topic": ("topic", lambda s: s.topic),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConversationDelta(_Frozen):
    conversation_id: str
    tags: dict[str, str] = Field(description="arc / persona / topic of the conversation, when known.")
    before: float
    after: float
    delta: float = Field(description="after - before (nats per token); negative is better.")


class SliceRow(_Frozen):
    value: str = Field(description=f"The slice's value; {UNKNOWN!r} for conversations without it.")
    n: int = Field(description="Held-out conversations in the slice.")
    mean_before: float
    mean_after: float
    mean_delta: float = Field(description="Mean per-conversation change (nats per token).")
    interval_95: tuple[float, float] | None = Field(
        None, description="Bootstrap 95 % interval of mean_delta; null for a single conversation."
    )


class SliceTables(_Frozen):
    conversations: list[ConversationDelta] = Field(default_factory=list)
    tables: dict[str, list[SliceRow]] = Field(
        default_factory=dict, description="arc / persona / topic -> one row per value."
    )
    unavailable: list[str] = Field(
        default_factory=list, description="Slices that could not be made, and why."
    )


def _tags(scaffolding: Scaffolding | None) -> dict[str, str]:
    if scaffolding is None:
        return {}
    return {k: v for k, (_, read) in SLICE_KEYS.items() if (v := read(scaffolding))}


def conversation_deltas(
    before: HeldOutLoss, after: HeldOutLoss, eval_conversations: Sequence[Conversation]
) -> list[ConversationDelta]:
    """One row per held-out source conversation measured both before and after."""
    groups: dict[str, list[Conversation]] = {}
    for c in eval_conversations:
        groups.setdefault(c.group, []).append(c)
    rows = []
    for group, members in sorted(groups.items()):
        ids = [c.id for c in members if c.id in before.per_conversation and c.id in after.per_conversation]
        if not ids:
            continue
        b = sum(before.per_conversation[i] for i in ids) / len(ids)
        a = sum(after.per_conversation[i] for i in ids) / len(ids)
        rows.append(
            ConversationDelta(
                conversation_id=group,
                tags=_tags(members[0].scaffolding),
                before=round(b, 6),
                after=round(a, 6),
                delta=round(a - b, 6),
            )
        )
    return rows


def _row(value: str, rows: list[ConversationDelta], seed: int) -> SliceRow:
    n = len(rows)
    iv = bootstrap_mean_interval([r.delta for r in rows], seed=seed)
    return SliceRow(
        value=value,
        n=n,
        mean_before=round(sum(r.before for r in rows) / n, 6),
        mean_after=round(sum(r.after for r in rows) / n, 6),
        mean_delta=round(sum(r.delta for r in rows) / n, 6),
        interval_95=None if iv is None else (round(iv[0], 6), round(iv[1], 6)),
    )


def slice_tables(
    before: HeldOutLoss | None,
    after: HeldOutLoss | None,
    eval_conversations: Sequence[Conversation],
    *,
    seed: int,
) -> SliceTables:
    """Per-conversation deltas and per-slice tables; `unavailable` names each slice not made."""
    if before is None or after is None:
        return SliceTables(
            unavailable=["no held-out loss was measured before and after, so no slice could be made"]
        )
    rows = conversation_deltas(before, after, eval_conversations)
    tables: dict[str, list[SliceRow]] = {}
    unavailable = []
    for key, (label, _) in SLICE_KEYS.items():
        if not any(key in r.tags for r in rows):
            unavailable.append(
                f"{label}: no held-out conversation is labelled with one "
                "(the file has no conversation_metadata.scaffolding for it)"
            )
            continue
        by_value: dict[str, list[ConversationDelta]] = {}
        for r in rows:
            by_value.setdefault(r.tags.get(key, UNKNOWN), []).append(r)
        tables[key] = [_row(v, members, seed) for v, members in sorted(by_value.items())]
    return SliceTables(conversations=rows, tables=tables, unavailable=unavailable)
