"""Statistics over seeds: means with Student-t confidence intervals, paired t-tests.

With n runs (seeds) of a variant and sample standard deviation s, the 95% interval of the mean is

    mean ± t_{0.975, n-1} · s / sqrt(n),

which assumes the per-seed results are independent draws from a roughly normal distribution.
Two variants trained with the same seeds share data split, shuffling order and (for equal
shapes) initialization, so their per-seed differences d_i = a_i - b_i are compared by a paired
t-test: t = mean(d) / (sd(d) / sqrt(n)), n - 1 degrees of freedom, two-sided p-value. It removes
the seed-to-seed variation both share, which makes it far more sensitive than comparing the two
intervals.

When every d_i is the same (sd(d) = 0) the t statistic is undefined (0 / 0 or x / 0), and
reading that as p = 0 would call "every seed better by exactly one test sample" significant
with two seeds. Accuracies are discrete (k / n_test), so with few seeds this happens often.
The p-value is then the exact two-sided sign test's: under the null each nonzero d_i is
positive or negative with probability 1/2, so n equal signs have p = min(1, 2 · 0.5^n)
(0.5 for 2 seeds, 0.0625 for 5, 0.00098 for 11); all d_i = 0 gives p = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["Comparison", "Interval", "mean_interval", "paired_comparison"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and the half-width of its confidence interval (NaN with fewer than 2 values)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, scale: float = 1.0, digits: int = 1, sign: bool = False) -> str:
        """``"97.2 ± 0.4"``; with fewer than two values the ``± …`` is ``(n=1)``."""
        value = round(self.mean * scale, digits) + 0.0  # + 0.0: no "-0.0"
        mean = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
        if math.isnan(self.half_width):
            return f"{mean} (n={self.n})"
        return f"{mean} ± {self.half_width * scale:.{digits}f}"


@dataclass(frozen=True)
class Comparison:
    """``a - b`` over paired seeds: the mean difference with its interval, and the p-value."""

    difference: Interval
    p_value: float


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` and the half-width of its Student-t confidence interval."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    if n == 1:
        return Interval(float(x[0]), math.nan, 1)
    quantile = stats.t.ppf(0.5 + confidence / 2, n - 1)
    return Interval(float(x.mean()), float(quantile * x.std(ddof=1) / math.sqrt(n)), n)


def _sign_test_p(n: int) -> float:
    """Exact two-sided sign-test p-value when all ``n`` nonzero differences share one sign."""
    return min(1.0, 2.0 * 0.5**n)


def paired_comparison(
    a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE
) -> Comparison:
    """Paired t-test of ``a`` against ``b`` (same seeds, same order).

    When every difference is the same (up to rounding) the t statistic is undefined; the p-value
    is then 1 if that difference is zero (identical results) and otherwise the exact two-sided
    sign test's, ``min(1, 2 * 0.5**n)`` for ``n`` differences of one sign (a constant shift is
    no stronger evidence than ``n`` seeds that all point the same way). Fewer than two pairs, or
    a NaN among them, give NaN.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have equal lengths, got {len(a)} and {len(b)}")
    differences = a - b
    interval = mean_interval(differences, confidence)
    if len(differences) < 2 or np.isnan(differences).any():
        p_value = math.nan
    elif np.ptp(differences) <= 1e-12 * max(1.0, float(np.abs(differences).max())):
        # Equal up to rounding (0.7 - 0.6 != 0.6 - 0.5 in binary): t would be noise / 0.
        identical = abs(differences.mean()) <= 1e-12
        p_value = 1.0 if identical else _sign_test_p(len(differences))
    else:
        p_value = float(stats.ttest_rel(a, b).pvalue)
    return Comparison(interval, p_value)
