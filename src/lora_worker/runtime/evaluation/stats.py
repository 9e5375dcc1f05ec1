"""Small, seeded statistics for the evidence: bootstrap intervals of a mean and of a rate.

Held-out sets are small (tens of conversations), so every number a report claims comes with a
95 % interval from a seeded percentile bootstrap, and wording that admits when the interval is too
wide to claim anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000  # percentile-bootstrap resamples: stable to about 0.01 on the interval ends
CONFIDENCE = 0.95


def bootstrap_mean_interval(
    values: Sequence[float], *, seed: int, resamples: int = RESAMPLES
) -> tuple[float, float] | None:
    """95 % percentile-bootstrap interval of the mean of `values`; None for fewer than two values."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return float(lo), float(hi)


def rate_interval(
    outcomes: Sequence[float], *, seed: int, resamples: int = RESAMPLES
) -> tuple[float, float] | None:
    """Interval of a win/tie/loss rate: outcomes are 1.0 (counts) or 0.0 (does not), per item."""
    return bootstrap_mean_interval(outcomes, seed=seed, resamples=resamples)
