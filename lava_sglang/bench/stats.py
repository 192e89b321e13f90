"""Confidence intervals for the benchmark tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound at 0 and at `trials`)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denominator = 1 + Z95**2 / trials
    centre = (p + Z95**2 / (2 * trials)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / trials + Z95**2 / (4 * trials**2)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], low: float = -math.inf, high: float = math.inf) -> tuple[float, float]:
    """95% Student-t interval of the mean (sample standard deviation: at 6 questions the normal
    quantile's would be a quarter too narrow), within [low, high], the range the values can
    take; for one value, the whole range (one value says nothing of the spread)."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return (low, high)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return (max(low, mean - half), min(high, mean + half))
