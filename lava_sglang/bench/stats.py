"""Confidence intervals for the benchmark tables."""

from __future__ import annotations

import math
from collections import defaultdict
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


def mean_interval(values: Sequence[float], documents: Sequence[int] | None = None, low: float = -math.inf,
                  high: float = math.inf) -> tuple[float, float]:
    """95% Student-t interval of the mean of `values`, within [low, high], the range they can
    take. With `documents` (each value's document) the spread is taken between documents: a
    document's questions are answered from one compressed copy and move together, so its values
    are one sample, not several (a cluster-robust standard error of the mean, with one degree of
    freedom fewer than documents; without `documents` each value is its own, the sample standard
    deviation's interval: at 6 questions the normal quantile's would be a quarter too narrow).
    For one document, the whole range (one says nothing of the spread)."""
    from scipy.stats import t

    count = len(values)
    if count == 0:
        raise ValueError("the mean of no values has no interval")
    mean = sum(values) / count
    sums: dict[int, float] = defaultdict(float)
    sizes: dict[int, int] = defaultdict(int)
    for value, document in zip(values, range(count) if documents is None else documents):
        sums[document] += value
        sizes[document] += 1
    clusters = len(sums)
    if clusters < 2:
        return (low, high)
    variance = clusters / (clusters - 1) * sum((sums[d] - mean * sizes[d]) ** 2 for d in sums) / count**2
    half = float(t.ppf(0.975, clusters - 1)) * math.sqrt(variance)
    return (max(low, mean - half), min(high, mean + half))


def share_interval(pairs: Sequence[tuple[int, int]], resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% interval of sum(right) / sum(reference_right): a configuration's right answers as a
    share of the full cache's on the same questions. pairs: (right, reference_right) per
    document. A percentile bootstrap over documents, not questions: a document's questions are
    answered from one compressed copy and tend to be right or wrong together, and both counts
    come from the same questions, so their ratio varies less than two independent proportions'.
    Seeded: a report gives the same interval each time. For one document, or none right on the
    reference side, (0, inf): nothing to resample."""
    import numpy as np

    right = np.array([pair[0] for pair in pairs], dtype=float)
    reference_right = np.array([pair[1] for pair in pairs], dtype=float)
    if len(pairs) < 2 or reference_right.sum() == 0:
        return (0.0, math.inf)
    picks = np.random.default_rng(seed).integers(0, len(pairs), size=(resamples, len(pairs)))
    right_sums, reference_sums = right[picks].sum(1), reference_right[picks].sum(1)
    # A resample whose documents the full cache answered none of has no finite share: it counts
    # above every other, which can only widen the upper end. The ends are resampled shares, not
    # interpolations between two (between two infinite ones that would be nan).
    shares = np.divide(right_sums, reference_sums, out=np.full(resamples, np.inf), where=reference_sums > 0)
    low = np.percentile(shares, 2.5, method="lower")
    high = np.percentile(shares, 97.5, method="higher")
    return (float(low), float(high))


def gap_interval(documents: Sequence[tuple[int, int, int]], resamples: int = 4000,
                 seed: int = 0) -> tuple[float, float] | None:
    """95% interval of 100 x (sum(right) - sum(other_right)) / sum(questions): the accuracy gap
    in points between two systems that answered the same questions. documents: (right,
    other_right, questions) per document; a percentile bootstrap over documents, paired (both
    systems' answers of a document move together), as `share_interval`. Seeded. None for fewer
    than two documents."""
    import numpy as np

    counts = np.array(documents, dtype=float).reshape(-1, 3)
    if len(counts) < 2 or counts[:, 2].sum() == 0:
        return None
    picks = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
    sums = counts[picks].sum(1)  # [resamples, 3]
    gaps = 100 * (sums[:, 0] - sums[:, 1]) / np.maximum(sums[:, 2], 1)
    return (float(np.percentile(gaps, 2.5, method="lower")), float(np.percentile(gaps, 97.5, method="higher")))

