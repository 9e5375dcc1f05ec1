"""Examples to micro-batches: planning within a token budget, and the tensors of one micro-batch.

Two ways to keep examples from seeing each other: `rows` (one example per right-padded row, causal
attention, no mask) and `packed` (examples back to back in one row with a block-diagonal mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora_worker.runtime.data.conversation import IGNORE_INDEX
from lora_worker.runtime.data.examples import Example


def plan_micro_batches(lengths: Sequence[int], *, token_budget: int, max_rows: int) -> list[list[int]]:
    """Group examples into micro-batches of similar length within a token budget.

    A micro-batch is rows right-padded to its longest row, so its cost is rows x longest; sorting
    by length keeps the padding small. Rows never see each other (one example per row, causal
    attention, no mask needed: real tokens never attend to the padding that follows them), which
    keeps sdpa on its fastest kernel (see BENCHMARKS.md).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * longest > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def plan_packed(lengths: Sequence[int], *, token_budget: int) -> list[list[int]]:
    """First-fit decreasing: examples concatenated into rows of at most token_budget tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, left in enumerate(room):
            if lengths[i] <= left:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
    return bins


def collate_packed(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """One padding-free row: examples back to back, positions restarting at 0 for each, and an
    explicit block-diagonal causal mask so no example attends to another. (Position ids alone are
    not a dependable isolation: whether they imply a mask depends on the attention kernel and the
    Transformers version.) The dense mask costs sdpa its flash kernel; see BENCHMARKS.md."""
    total = sum(len(e.input_ids) for e in examples)
    ids = torch.empty((1, total), dtype=torch.long)
    labels = torch.empty((1, total), dtype=torch.long)
    pos = torch.empty((1, total), dtype=torch.long)
    mask = torch.zeros((1, 1, total, total), dtype=torch.bool)
    at = 0
    for e in examples:
        n = len(e.input_ids)
        ids[0, at : at + n] = torch.tensor(e.input_ids)
        labels[0, at : at + n] = torch.tensor(e.labels)
        pos[0, at : at + n] = torch.arange(n)
        mask[0, 0, at : at + n, at : at + n] = torch.tril(torch.ones((n, n), dtype=torch.bool))
        at += n
    # Every example's first label is IGNORE_INDEX (its <bos> is prompt), so the shifted loss never
    # asks one example's last token to predict the next example's first.
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one micro-batch: input_ids, labels (padding is IGNORE_INDEX)."""
    longest = max(len(e.input_ids) for e in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[r, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}
