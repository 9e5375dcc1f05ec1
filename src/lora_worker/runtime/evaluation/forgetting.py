"""Catastrophic-forgetting probe: the loss of short reference answers to general questions (facts,
arithmetic, instructions, code, everyday reasoning), with the adapter disabled (the base model)
and enabled, in mean nats per reference token.

The set is `forgetting_probe.jsonl` beside this module, written for this project. The references
are tokenized exactly like training targets (the chat template, loss on the assistant turn and its
end-of-turn token) and measured with the held-out loss code. A rise of more than `WARN_RELATIVE`
(5 %) in the mean is warned about: an adapter for one voice should leave general answers close to
where the base model had them (the threshold is chosen, not measured).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.data.conversation import Conversation, Message
from lora_worker.runtime.data.examples import build_examples
from lora_worker.runtime.evaluation.loss import HeldOutLoss, held_out_loss
from lora_worker.runtime.evaluation.stats import bootstrap_mean_interval

PROBE_PATH = Path(__file__).with_name("forgetting_probe.jsonl")
WARN_RELATIVE = 0.05  # a rise of the probe's mean loss above 5 % is warned about


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ProbeItem(_Frozen):
    id: str
    kind: str
    prompt: str
    reference: str


class KindRow(_Frozen):
    kind: str
    n: int
    before: float
    after: float
    delta: float


class Forgetting(_Frozen):
    items: int
    tokens: int = Field(description="Reference tokens measured.")
    before: float = Field(description="Mean nats per reference token, adapter disabled.")
    after: float = Field(description="Mean nats per reference token, adapter enabled.")
    delta: float
    relative: float = Field(description="delta / before.")
    interval_95: tuple[float, float] | None = Field(
        None, description="Bootstrap 95 % interval of the mean per-item change."
    )
    by_kind: list[KindRow] = Field(default_factory=list)
    threshold: float = Field(WARN_RELATIVE, description="A relative rise above this is warned about.")
    warning: str | None = None


def load_probe(path: Path = PROBE_PATH) -> list[ProbeItem]:
    """The probe's items; a broken shipped file is a bug, so errors name the line and raise."""
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                items.append(ProbeItem.model_validate(json.loads(line)))
            except ValueError as err:
                raise ValueError(f"{path.name} line {n}: {err}") from None
    return items


def _conversations(items: Sequence[ProbeItem]) -> list[Conversation]:
    return [
        Conversation(
            id=i.id,
            messages=(Message("user", i.prompt), Message("assistant", i.reference, train=True)),
        )
        for i in items
    ]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def compare(
    items: Sequence[ProbeItem], before: HeldOutLoss, after: HeldOutLoss, *, seed: int, threshold: float
) -> Forgetting:
    """The probe's figures from the two measurements (pure: no model)."""
    ids = [i.id for i in items if i.id in before.per_conversation and i.id in after.per_conversation]
    deltas = [after.per_conversation[i] - before.per_conversation[i] for i in ids]
    iv = bootstrap_mean_interval(deltas, seed=seed)
    kinds: dict[str, list[str]] = {}
    for i in items:
        if i.id in ids:
            kinds.setdefault(i.kind, []).append(i.id)
    rows = [
        KindRow(
            kind=k,
            n=len(v),
            before=round(_mean([before.per_conversation[i] for i in v]), 4),
            after=round(_mean([after.per_conversation[i] for i in v]), 4),
            delta=round(_mean([after.per_conversation[i] - before.per_conversation[i] for i in v]), 4),
        )
        for k, v in sorted(kinds.items())
    ]
    delta = after.mean - before.mean
    relative = delta / before.mean if before.mean else 0.0
    warning = None
    if relative > threshold:
        warning = (
            f"forgetting probe: loss on {len(ids)} general questions rose from {before.mean:.4f} to "
            f"{after.mean:.4f} nats per token ({relative * 100:+.1f} %, more than {threshold * 100:.0f} %): "
            "the adapter may have lost some general ability"
        )
    return Forgetting(
        items=len(ids),
        tokens=after.tokens,
        before=round(before.mean, 4),
        after=round(after.mean, 4),
        delta=round(delta, 4),
        relative=round(relative, 4),
        interval_95=None if iv is None else (round(iv[0], 4), round(iv[1], 4)),
        by_kind=rows,
        threshold=threshold,
        warning=warning,
    )


def forgetting_probe(
    model,
    tokenizer,
    *,
    pad_id: int,
    token_budget: int,
    max_rows: int,
    max_seq_length: int,
    seed: int,
    items: Sequence[ProbeItem] | None = None,
    threshold: float = WARN_RELATIVE,
) -> Forgetting | None:
    """Measure the probe on a PEFT model, adapter disabled then enabled; None if nothing fits."""
    items = list(items) if items is not None else load_probe()
    examples, _ = build_examples(tokenizer, _conversations(items), max_seq_length)
    if not examples:
        return None
    with model.disable_adapter():
        before = held_out_loss(model, examples, pad_id, token_budget=token_budget, max_rows=max_rows)
    after = held_out_loss(model, examples, pad_id, token_budget=token_budget, max_rows=max_rows)
    if before is None or after is None:
        return None
    return compare(items, before, after, seed=seed, threshold=threshold)
