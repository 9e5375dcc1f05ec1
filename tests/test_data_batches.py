"""Micro-batches: planning within a token budget, and isolation of the examples in one batch
(right-padded rows, or packed back to back with a block-diagonal mask), checked on the tiny NF4
model; folding trains the same target tokens with the same losses as pair by pair."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE

from lora_worker.runtime.data import (
    IGNORE_INDEX,
    Example,
    build_examples,
    collate,
    collate_packed,
    load_dataset,
    plan_micro_batches,
    plan_packed,
)


def test_micro_batches_respect_budget_and_rows():
    lengths = [100, 900, 250, 240, 1000, 60, 500, 510]
    plan = plan_micro_batches(lengths, token_budget=1024, max_rows=4)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for b in plan:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1024


def test_packed_plan_fills_rows_within_the_budget():
    lengths = [500, 300, 200, 900, 100]
    plan = plan_packed(lengths, token_budget=1000)
    assert sorted(i for b in plan for i in b) == [0, 1, 2, 3, 4]
    assert all(sum(lengths[i] for i in b) <= 1000 for b in plan) and len(plan) == 2


def _loss_per_token(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


@pytest.fixture(scope="module")
def nf4_model(tiny_model):
    from lora_worker.runtime.model.load import load_base_model

    return load_base_model(tiny_model)


def _three_examples(tokenizer) -> list[Example]:
    convs = load_dataset(SAMPLE).conversations
    exs, _ = build_examples(tokenizer, convs[:3], 512)
    return exs[:3]


def test_padded_rows_do_not_attend_to_each_other(nf4_model, tokenizer):
    """Isolation: an example's per-token loss is the same alone or in a right-padded micro-batch."""
    exs = _three_examples(tokenizer)
    pad = tokenizer.pad_token_id
    together = _loss_per_token(nf4_model, collate(exs, pad))
    for r, e in enumerate(exs):
        alone = _loss_per_token(nf4_model, collate([e], pad))
        n = len(e.input_ids) - 1
        assert torch.allclose(together[r, :n], alone[0, :n], atol=2e-2), r
        assert (together[r, n:] == 0).all()  # padding carries no loss


def test_packed_row_isolates_examples(nf4_model, tokenizer):
    """`packing: packed`: examples back to back in one row; each one's per-token loss is as alone."""
    exs = _three_examples(tokenizer)
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


def test_folded_loss_equals_pair_by_pair_loss(nf4_model, tokenizer):
    """Same target tokens, same contexts: folding changes the cost, not what is learned."""
    convs = load_dataset(SAMPLE, fold=True).conversations
    pairs = load_dataset(SAMPLE, fold=False).conversations
    cid = convs[0].id
    folded, _ = build_examples(tokenizer, [convs[0]], 100_000)
    unfolded, _ = build_examples(tokenizer, [c for c in pairs if c.group == cid], 100_000)
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


def test_padding_fraction_counts_each_micro_batch_as_trained():
    from lora_worker.runtime.training.trainer import make_schedule, padding_fraction, split_schedule

    exs = [Example("c", tuple(range(n)), tuple(range(n))) for n in (10, 10, 6, 2)]
    plan = [[0, 1], [2, 3]]  # 20 real of 20, then 8 real of 12
    assert padding_fraction(exs, plan) == round(1 - 28 / 32, 4)
    # every epoch and a split after an OOM train the same positions: the same share
    assert padding_fraction(exs, make_schedule(plan, 3, seed=1)) == padding_fraction(exs, plan)
    assert padding_fraction(exs, split_schedule(plan)) == 0.0  # one row each: no padding left
