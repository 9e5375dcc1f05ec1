"""Greedy replies that also say whether the model stopped by itself (emitted an end-of-turn token)
or ran into `max_new_tokens`: the scenarios' replies and the end-of-turn check come from one pass.

Decoded text alone cannot tell a reply that ended on `<|eot_id|>` from one cut at the limit, so
this module keeps the generated ids. Generation stops on any end-of-turn id the training data ends
its targets with (`data.examples.end_of_turn_ids`). On accelerator out-of-memory a reply is retried
with half the new tokens, down to `MIN_NEW_TOKENS`; the budget it finished with is kept with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_worker.runtime.data.examples import end_of_turn_ids
from lora_worker.runtime.device import free_accelerator_memory, out_of_memory_message

MIN_NEW_TOKENS = 16


@dataclass(frozen=True)
class Reply:
    text: str
    new_tokens: int  # generated tokens, the end-of-turn token included
    stopped: bool  # ended with an end-of-turn token before running out of new tokens
    max_new_tokens: int  # the budget it was generated with (smaller after an out-of-memory retry)


@torch.no_grad()
def greedy_replies(
    model,
    tokenizer,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    warnings: list[str] | None = None,
    label: str = "scenario",
) -> list[Reply]:
    """Greedy reply to each chat prompt, one prompt at a time (no padding effects)."""
    end_ids = sorted(end_of_turn_ids(tokenizer))
    was_training = model.training
    model.eval()
    try:
        return [
            _reply(model, tokenizer, p, max_new_tokens, end_ids, f"{label} {n}", warnings)
            for n, p in enumerate(prompts, start=1)
        ]
    finally:
        if was_training:
            model.train()


def _reply(model, tokenizer, messages, max_new_tokens, end_ids, name, warnings) -> Reply:
    tokens = max_new_tokens
    while True:
        try:
            reply = _greedy(model, tokenizer, messages, tokens, end_ids)
            message = None
        except Exception as err:
            message = out_of_memory_message(err)
            if message is None:
                raise
        if message is None:
            if tokens < max_new_tokens and warnings is not None:
                warnings.append(
                    f"{name}: out of memory at {max_new_tokens} new tokens; generated up to {tokens}"
                )
            return reply
        free_accelerator_memory()  # outside the except block: the failed attempt is unreferenced
        if tokens <= MIN_NEW_TOKENS:
            if warnings is not None:
                warnings.append(f"{name}: out of memory even at {tokens} new tokens; left empty ({message})")
            return Reply(text="", new_tokens=0, stopped=False, max_new_tokens=0)
        tokens = max(MIN_NEW_TOKENS, tokens // 2)


def _greedy(model, tokenizer, messages, max_new_tokens: int, end_ids: list[int]) -> Reply:
    device = next(p.device for p in model.parameters())
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    enc = {k: v.to(device) for k, v in enc.items()}
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=end_ids or None,
            use_cache=True,
            # a sharded model's other ranks mirror each forward (parallel/relay.py), not generate's
            # own per-token agreement, which Transformers turns on for FSDP-managed models
            synced_gpus=False,
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    ends = set(end_ids)
    cut = next((i + 1 for i, t in enumerate(new) if t in ends), None)
    kept = new if cut is None else new[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return Reply(text=text, new_tokens=len(kept), stopped=cut is not None, max_new_tokens=max_new_tokens)
