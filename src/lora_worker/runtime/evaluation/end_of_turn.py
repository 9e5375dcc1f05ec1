"""Does the adapted model still stop? The share of replies that end with an end-of-turn token
before `max_new_tokens`, for the base model (adapter disabled) and the adapted model on the same
prompts, with a warning when the adapted share falls clearly below the base share.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.evaluation.replies import Reply

# A drop of more than 10 percentage points in the share of replies that stop is flagged: with the
# usual 10-50 scenarios one or two replies running long is noise, a tenth of them is a pattern
# (chosen, not measured).
DROP_WARN = 0.10


class EndOfTurn(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    replies: int = Field(description="Prompts answered by both models.")
    max_new_tokens: int
    base_stopped: int = Field(description="Base replies that ended with an end-of-turn token.")
    adapted_stopped: int
    base_share: float
    adapted_share: float
    drop: float = Field(
        description="base_share - adapted_share; positive means the adapter stops less often."
    )
    threshold: float = Field(DROP_WARN, description="A drop above this is warned about.")
    warning: str | None = None


def end_of_turn_check(
    base: Sequence[Reply], adapted: Sequence[Reply], *, max_new_tokens: int, threshold: float = DROP_WARN
) -> EndOfTurn | None:
    """Stop shares of paired replies; None without replies."""
    n = min(len(base), len(adapted))
    if n == 0:
        return None
    b = sum(r.stopped for r in base[:n])
    a = sum(r.stopped for r in adapted[:n])
    bs, as_ = b / n, a / n
    drop = bs - as_
    warning = None
    if drop > threshold:
        warning = (
            f"end of turn: {a} of {n} adapted replies ({as_:.0%}) stopped before {max_new_tokens} new tokens, "
            f"against {b} of {n} ({bs:.0%}) for the base model, a drop of {drop * 100:.0f} points "
            f"(more than {threshold * 100:.0f}): the adapter may not have learned to end its turn"
        )
    return EndOfTurn(
        replies=n,
        max_new_tokens=max_new_tokens,
        base_stopped=b,
        adapted_stopped=a,
        base_share=round(bs, 4),
        adapted_share=round(as_, 4),
        drop=round(drop, 4),
        threshold=threshold,
        warning=warning,
    )
