"""Pairwise preferences between the base and the adapted model, counted the same way for every
judge (a model judge, or the studio's staff filling in the blinded sheet).

Each scenario ends as one preference: `adapted` (a win for the adapter), `base` (a loss) or `tie`.
Rates come with seeded bootstrap 95 % intervals (evaluation/stats.py), and so does the net margin
(win share minus loss share, the mean of +1 / 0 / -1 per scenario). The words claim a difference
only when that interval lies entirely on one side of zero AND a two-sided sign test on the
decisive scenarios (wins against losses, ties left out) gives p < 0.05: on a handful of scenarios
the bootstrap interval collapses (four wins of four give [1, 1]) while four coin flips land the
same way one time in eight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_worker.runtime.evaluation.stats import bootstrap_mean_interval, rate_interval

Preference = Literal["adapted", "base", "tie"]
PREFERENCES: tuple[Preference, ...] = ("adapted", "base", "tie")
SCORE: dict[str, float] = {"adapted": 1.0, "tie": 0.0, "base": -1.0}
SIGN_TEST_ALPHA = 0.05


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Rate(_Frozen):
    share: float = Field(description="0..1 of the scenarios counted.")
    interval_95: tuple[float, float] | None = Field(
        None, description="Bootstrap 95 % interval; null for fewer than two scenarios."
    )


class PreferenceRates(_Frozen):
    """Win / tie / loss of the adapted model against the base model over `n` scenarios."""

    n: int
    wins: int = Field(description="Scenarios where the adapted reply was preferred.")
    ties: int
    losses: int = Field(description="Scenarios where the base reply was preferred.")
    win: Rate
    tie: Rate
    loss: Rate
    net: Rate = Field(description="Win share minus loss share (-1..1), with its interval.")
    sign_test_p: float = Field(description="Two-sided sign test of wins against losses (ties left out).")

    @property
    def conclusive(self) -> bool:
        """True when a difference can be claimed: the net margin's interval excludes zero and the
        sign test agrees."""
        iv = self.net.interval_95
        return iv is not None and (iv[0] > 0 or iv[1] < 0) and self.sign_test_p < SIGN_TEST_ALPHA


class SliceRates(_Frozen):
    value: str
    rates: PreferenceRates


class PreferenceSummary(_Frozen):
    overall: PreferenceRates | None = Field(None, description="Null when no scenario was counted.")
    slices: dict[str, list[SliceRates]] = Field(
        default_factory=dict, description="Tag name (arc, persona, ...) -> one row per tag value."
    )


def _rate(flags: list[float], seed: int) -> Rate:
    share = sum(flags) / len(flags)
    iv = rate_interval(flags, seed=seed)
    return Rate(share=round(share, 4), interval_95=_round(iv))


def _round(iv: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if iv is None else (round(iv[0], 4), round(iv[1], 4))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of wins against losses at p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def preference_rates(preferences: Sequence[Preference], *, seed: int) -> PreferenceRates | None:
    """The rates of a list of preferences; None when it is empty."""
    if not preferences:
        return None
    wins = [1.0 if p == "adapted" else 0.0 for p in preferences]
    ties = [1.0 if p == "tie" else 0.0 for p in preferences]
    losses = [1.0 if p == "base" else 0.0 for p in preferences]
    scores = [SCORE[p] for p in preferences]
    net_iv = bootstrap_mean_interval(scores, seed=seed)
    return PreferenceRates(
        n=len(preferences),
        wins=int(sum(wins)),
        ties=int(sum(ties)),
        losses=int(sum(losses)),
        win=_rate(wins, seed),
        tie=_rate(ties, seed),
        loss=_rate(losses, seed),
        net=Rate(share=round(sum(scores) / len(scores), 4), interval_95=_round(net_iv)),
        sign_test_p=round(sign_test(int(sum(wins)), int(sum(losses))), 4),
    )


def summarize_preferences(
    items: Sequence[tuple[Preference, Mapping[str, str]]], *, seed: int
) -> PreferenceSummary:
    """Overall and per-tag rates of (preference, tags) items, tag values in sorted order."""
    by_tag: dict[str, dict[str, list[Preference]]] = {}
    for pref, tags in items:
        for key, value in tags.items():
            by_tag.setdefault(key, {}).setdefault(value, []).append(pref)
    slices = {
        key: [
            SliceRates(value=value, rates=preference_rates(prefs, seed=seed))  # type: ignore[arg-type]
            for value, prefs in sorted(values.items())
        ]
        for key, values in sorted(by_tag.items())
    }
    return PreferenceSummary(overall=preference_rates([p for p, _ in items], seed=seed), slices=slices)


def _pct(x: float) -> str:
    return f"{x * 100:.0f} %"


def _span(iv: tuple[float, float] | None) -> str:
    return f" (95 % interval {iv[0] * 100:.0f}-{iv[1] * 100:.0f} %)" if iv else ""


def preference_sentence(rates: PreferenceRates | None, *, judged_by: str, unit: str = "scenario") -> str:
    """One sentence from the numbers only: who was preferred how often, and whether the net margin's
    interval allows a claim."""
    if rates is None:
        return f"No {unit} was judged, so there is no comparison of replies."
    n = rates.n
    what = f"{n} {unit}{'' if n == 1 else 's'}"
    shares = (
        f"the adapted model's reply was preferred in {_pct(rates.win.share)}{_span(rates.win.interval_95)}, "
        f"the base model's in {_pct(rates.loss.share)}{_span(rates.loss.interval_95)}, "
        f"and {_pct(rates.tie.share)} were ties"
    )
    net = rates.net
    margin = f"{net.share * 100:+.0f} points"
    if rates.wins == rates.losses == 0:
        claim = f"every {unit} was a tie, so no difference shows"
    elif net.interval_95 is None:
        claim = f"with a single {unit} there is no interval, so no difference can be claimed"
    else:
        lo, hi = (v * 100 for v in net.interval_95)
        span = f"95 % interval {lo:+.0f} to {hi:+.0f}"
        if rates.conclusive:
            side = "adapted" if lo > 0 else "base"
            claim = f"the net margin of {margin} ({span}) favours the {side} model"
        elif lo > 0 or hi < 0:
            decisive = rates.wins + rates.losses
            claim = (
                f"the net margin is {margin} ({span}), but {decisive} decisive {unit}s are too few to claim a "
                f"difference (sign test p = {rates.sign_test_p:.2f})"
            )
        else:
            claim = (
                f"the net margin of {margin} has an interval ({span}) that includes zero, "
                f"too wide to claim a difference"
            )
    return f"Judged blind by {judged_by} on {what}, {shares}; {claim}."
