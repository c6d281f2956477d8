"""Small-sample statistics for comparing strategies over seeds: mean, std and paired t confidence intervals.

Seeds are few (3 to 5), so intervals use Student's t distribution, not a normal approximation or a bootstrap. The
t quantile is computed here (bisection on the CDF, which is the regularised incomplete beta function evaluated with
Lentz's continued fraction) so that arkd needs no SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PairedDifference", "mean_std", "paired_difference", "student_t_cdf", "student_t_quantile"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_std needs at least one value, got an empty sequence.")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _regularized_incomplete_beta(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) with ``y = 1 - x`` passed separately, so that x close to 1 loses no precision."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t distribution with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}.")
    tail = 0.5 * _regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t value with ``student_t_cdf(t, df) == p`` (bisection to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}.")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a[i] - b[i]`` over paired runs (same seeds) with a two-sided t confidence interval."""

    mean: float
    std: float
    n: int
    low: float
    high: float
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return self.n > 1 and (self.low > 0.0 or self.high < 0.0)


def paired_difference(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> PairedDifference:
    """Paired difference ``a - b`` over matching seeds, with a Student-t interval of the mean.

    Args:
        a: scores of one strategy, one per seed.
        b: scores of the other strategy on the same seeds, in the same order.
        confidence: two-sided level of the interval.

    Returns:
        A :class:`PairedDifference`; with a single pair the interval is undefined (NaN bounds).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs one score per seed on both sides, got {len(a)} and {len(b)}.")
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    if n < 2:
        return PairedDifference(mean, std, n, math.nan, math.nan, confidence)
    half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return PairedDifference(mean, std, n, mean - half, mean + half, confidence)
