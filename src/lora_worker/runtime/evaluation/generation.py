"""Greedy completions of held-out prompts, one prompt at a time (no padding effects).

On accelerator out-of-memory a sample is retried with half the new tokens (down to
`MIN_NEW_TOKENS`), after the failed attempt's tensors are released; a sample that still does not
fit is left empty. Each shortened or empty sample is named in `warnings`.
"""

from __future__ import annotations

import torch

from lora_worker.runtime.device import free_accelerator_memory, out_of_memory_message

MIN_NEW_TOKENS = 16


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    warnings: list[str] | None = None,
) -> list[str]:
    """Greedy completion of each chat prompt (a list of {"role", "content"} messages)."""
    was_training = model.training
    model.eval()
    outs: list[str] = []
    try:
        for n, messages in enumerate(prompts, start=1):
            outs.append(_one_sample(model, tokenizer, messages, max_new_tokens, n, warnings))
    finally:
        if was_training:
            model.train()
    return outs


def _one_sample(model, tokenizer, messages, max_new_tokens: int, n: int, warnings: list[str] | None) -> str:
    tokens = max_new_tokens
    while True:
        text, message = _try_generate(model, tokenizer, messages, tokens)
        if message is None:
            if tokens < max_new_tokens and warnings is not None:
                warnings.append(
                    f"sample {n}: out of memory at {max_new_tokens} new tokens; generated up to {tokens}"
                )
            return text
        free_accelerator_memory()  # outside the except block: the failed attempt is unreferenced
        if tokens <= MIN_NEW_TOKENS:
            if warnings is not None:
                warnings.append(
                    f"sample {n}: out of memory even at {tokens} new tokens; left empty ({message})"
                )
            return ""
        tokens = max(MIN_NEW_TOKENS, tokens // 2)


def _try_generate(model, tokenizer, messages, max_new_tokens: int) -> tuple[str, str | None]:
    try:
        return _greedy(model, tokenizer, messages, max_new_tokens), None
    except Exception as err:
        message = out_of_memory_message(err)
        if message is None:
            raise
        return "", message


def _greedy(model, tokenizer, messages, max_new_tokens: int) -> str:
    device = next(p.device for p in model.parameters())
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = {k: v.to(device) for k, v in ids.items()}
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        gen = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
    return tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
