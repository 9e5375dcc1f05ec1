"""The job's verdict: did the adapter lower held-out loss by more than noise?

`improved`, `unchanged`, `worse` or `not_measured`, decided from numbers only:

- the relative change of the token-weighted held-out loss must pass `NOISE_THRESHOLD` (0.5 %), a
  stated floor below which no change is claimed (chosen, not measured: bf16 evaluation and small
  held-out sets move the loss by fractions of a percent without any real change);
- and, with two or more held-out conversations, the bootstrap 95 % interval of the mean
  per-conversation change must lie entirely on the same side of zero.

Anything else is `unchanged`: the numbers cannot tell the adapter from the base model.
"""

from __future__ import annotations

from collections.abc import Mapping

from lora_worker.runtime.contracts import Outcome
from lora_worker.runtime.evaluation.stats import bootstrap_mean_interval

NOISE_THRESHOLD = 0.005  # |relative change| of held-out loss at or below this is noise


def decide(
    before: float | None,
    after: float | None,
    *,
    per_conversation_before: Mapping[str, float] | None = None,
    per_conversation_after: Mapping[str, float] | None = None,
    seed: int = 0,
    threshold: float = NOISE_THRESHOLD,
) -> Outcome:
    """The verdict from held-out loss before and after (nats per trained token)."""
    if before is None or after is None:
        return Outcome(
            verdict="not_measured",
            reason="no held-out conversation was evaluated, so nothing shows whether the adapter helped",
            threshold=threshold,
        )
    pb, pa = per_conversation_before or {}, per_conversation_after or {}
    deltas = [pa[c] - pb[c] for c in sorted(pb.keys() & pa.keys())]
    interval = bootstrap_mean_interval(deltas, seed=seed)
    delta = after - before
    relative = delta / before if before else 0.0
    common = dict(
        delta=round(delta, 6),
        relative_delta=round(relative, 6),
        interval_95=(round(interval[0], 6), round(interval[1], 6)) if interval else None,
        threshold=threshold,
        conversations=len(deltas),
    )
    change = f"held-out loss {before:.4f} → {after:.4f} ({relative * 100:+.1f} %)"
    span = (
        f"; 95 % interval of the per-conversation change [{interval[0]:+.4f}, {interval[1]:+.4f}]"
        if interval
        else ""
    )
    if abs(relative) <= threshold:
        reason = f"{change}, within the {threshold * 100:.1f} % noise threshold{span}"
        return Outcome(verdict="unchanged", reason=reason, **common)
    if interval is not None and interval[0] <= 0 <= interval[1]:
        reason = f"{change}, but the interval includes no change{span}"
        return Outcome(verdict="unchanged", reason=reason, **common)
    verdict = "improved" if delta < 0 else "worse"
    return Outcome(verdict=verdict, reason=f"{change}{span}", **common)
