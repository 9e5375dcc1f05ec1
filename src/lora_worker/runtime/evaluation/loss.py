"""Held-out loss: mean cross-entropy per trained (assistant) token, overall and per conversation.

Computed the same way before training, during it and after it: micro-batches of right-padded
rows planned within a token budget, bf16 autocast, the loss of each row summed in float32. On
accelerator out-of-memory the rest of the set is re-planned with half the token budget and half
the rows (the failed micro-batch included) and measured on; only a single sequence that does not
fit is an error.

A NaN or infinite result raises `NonFiniteLoss` rather than returning it: a non-finite number
would otherwise pass through JSON as null and read as "not measured".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_worker.runtime.data.batches import collate, plan_micro_batches
from lora_worker.runtime.data.conversation import IGNORE_INDEX
from lora_worker.runtime.data.examples import Example
from lora_worker.runtime.device import free_accelerator_memory, out_of_memory_message


class NonFiniteLoss(ArithmeticError):
    """A loss came out NaN or infinite; the message says where."""


class EvalOutOfMemory(RuntimeError):
    """A single held-out sequence does not fit in accelerator memory."""


@dataclass(frozen=True)
class HeldOutLoss:
    mean: float  # nats per trained token, over every held-out example
    tokens: int  # trained tokens measured
    per_conversation: dict[str, float]  # conversation id -> nats per trained token
    token_budget: int  # the micro-batch token budget it finished with (halved per out-of-memory)
    retries: int = 0  # out-of-memory errors recovered from


def eval_loss(
    model, examples: Sequence[Example], pad_id: int, *, token_budget: int, max_rows: int
) -> float | None:
    """Mean held-out loss (nats per trained token); None without examples; NonFiniteLoss if NaN/inf."""
    result = held_out_loss(model, examples, pad_id, token_budget=token_budget, max_rows=max_rows)
    return result.mean if result else None


def perplexity(loss: float | None) -> float | None:
    return round(math.exp(loss), 4) if loss is not None and loss < 50 else None


@torch.no_grad()
def held_out_loss(
    model, examples: Sequence[Example], pad_id: int, *, token_budget: int, max_rows: int
) -> HeldOutLoss | None:
    """The held-out loss overall and per conversation; None without examples (or trained tokens)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    retries = 0
    try:
        todo = plan_micro_batches(
            [len(e.input_ids) for e in examples], token_budget=token_budget, max_rows=max_rows
        )
        while todo:
            batch = todo.pop(0)
            rows, message = _measure(model, [examples[i] for i in batch], pad_id)
            if message is not None:
                # Outside the except block: the failed forward's tensors are already unreferenced.
                free_accelerator_memory()
                if len(batch) == 1:
                    n = len(examples[batch[0]].input_ids)
                    raise EvalOutOfMemory(
                        f"out of memory evaluating one held-out sequence of {n} tokens ({message})"
                    )
                retries += 1
                token_budget, max_rows = max(1, token_budget // 2), max(1, max_rows // 2)
                rest = batch + [i for b in todo for i in b]
                lengths = [len(examples[i].input_ids) for i in rest]
                todo = [
                    [rest[j] for j in b]
                    for b in plan_micro_batches(lengths, token_budget=token_budget, max_rows=max_rows)
                ]
                continue
            for i, (loss_sum, n) in zip(batch, rows, strict=True):
                cid = examples[i].conversation_id
                sums[cid] += loss_sum
                counts[cid] += n
    finally:
        if was_training:
            model.train()
    return _summarise(sums, counts, token_budget, retries)


def _measure(model, batch: list[Example], pad_id: int) -> tuple[list[tuple[float, int]], str | None]:
    """(summed loss, trained tokens) per row, or the message of an out-of-memory error."""
    try:
        return _row_losses(model, batch, pad_id), None
    except Exception as err:
        message = out_of_memory_message(err)
        if message is None:
            raise
        return [], message


def _row_losses(model, batch: list[Example], pad_id: int) -> list[tuple[float, int]]:
    device = next(p.device for p in model.parameters())
    tensors = collate(batch, pad_id)
    ids, labels = tensors["input_ids"].to(device), tensors["labels"].to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    out = []
    for r in range(ids.shape[0]):  # one row at a time: float32 logits of a whole batch may not fit
        target = labels[r, 1:]
        loss = F.cross_entropy(logits[r, :-1].float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        out.append((float(loss), int((target != IGNORE_INDEX).sum())))
    return out


def _summarise(
    sums: dict[str, float], counts: dict[str, int], budget: int, retries: int
) -> HeldOutLoss | None:
    tokens = sum(counts.values())
    if not tokens:
        return None
    mean = sum(sums.values()) / tokens
    per = {cid: sums[cid] / counts[cid] for cid in sorted(counts) if counts[cid]}
    if not math.isfinite(mean):
        bad = [cid for cid, v in per.items() if not math.isfinite(v)]
        raise NonFiniteLoss(
            f"held-out loss is {mean} over {tokens} tokens; non-finite in {len(bad)} of {len(per)} "
            f"conversations (first: {bad[0] if bad else '?'})"
        )
    return HeldOutLoss(mean=mean, tokens=tokens, per_conversation=per, token_budget=budget, retries=retries)
