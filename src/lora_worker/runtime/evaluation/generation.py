"""Greedy completions of chat prompts as text: `replies.greedy_replies` without the stop reasons.

One generation path for the job's samples, the judge and the scenarios: one prompt at a time (no
padding effects), stopping on the end-of-turn ids the training data ends its targets with, and
retried with fewer new tokens on accelerator out-of-memory (each shortened or empty reply named in
`warnings`).
"""

from __future__ import annotations

from lora_worker.runtime.evaluation.replies import MIN_NEW_TOKENS, greedy_replies

__all__ = ["MIN_NEW_TOKENS", "generate"]


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    warnings: list[str] | None = None,
) -> list[str]:
    """Greedy completion of each chat prompt (a list of {"role", "content"} messages)."""
    replies = greedy_replies(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, warnings=warnings, label="sample"
    )
    return [r.text for r in replies]
