"""Small-sample statistics for comparing strategies over seeds: mean, std and paired t confidence intervals.

Seeds are few (3 to 5), so intervals use Student's t distribution, not a normal approximation or a bootstrap. The
t quantile is computed here (bisection on the CDF, which is the regularised incomplete beta function evaluated with
Lentz's continued fraction). The omnibus test over strategies x seeds is Friedman's (:func:`friedman`, SciPy), and
many paired comparisons are corrected with Holm's step-down procedure (:func:`holm_adjust`, :func:`holm_levels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Omnibus",
    "PairedDifference",
    "friedman",
    "holm_adjust",
    "holm_levels",
    "mean_std",
    "paired_difference",
    "paired_t_p_value",
    "ranks_within_blocks",
    "student_t_cdf",
    "student_t_quantile",
]


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


def paired_t_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p value of the paired t test of ``a - b`` (1.0 when every difference is 0; 0.0 when they are all
    equal and non-zero; NaN for a single pair)."""
    diff = paired_difference(a, b)
    if diff.n < 2:
        return math.nan
    if diff.std == 0.0:
        return 1.0 if diff.mean == 0.0 else 0.0
    t = diff.mean / (diff.std / math.sqrt(diff.n))
    return 2.0 * (1.0 - student_t_cdf(abs(t), diff.n - 1))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p values, in the input order: with p_(1) <= ... <= p_(m),
    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). NaN entries stay NaN and do not count in m."""
    indexed = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    indexed.sort()
    m = len(indexed)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def holm_levels(p_values: Sequence[float], alpha: float = 0.05) -> list[float]:
    """The per-comparison significance level Holm's procedure gives each p value, in the input order: alpha / (m - r)
    for the comparison of rank r (0: the smallest p). Its interval at confidence ``1 - level`` excludes 0 exactly when
    the unadjusted test at that level rejects."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    out = [math.nan] * len(p_values)
    for rank, (_, i) in enumerate(indexed):
        out[i] = alpha / (m - rank)
    return out


def ranks_within_blocks(matrix: Sequence[Sequence[float]], *, higher_is_better: bool = True) -> list[list[float]]:
    """Ranks (1 = best) of each row's entries, ties sharing their mean rank: ``matrix[block][treatment]``."""
    out = []
    for row in matrix:
        keyed = sorted(range(len(row)), key=lambda j: -row[j] if higher_is_better else row[j])
        ranks = [0.0] * len(row)
        pos = 0
        while pos < len(keyed):
            end = pos
            while end + 1 < len(keyed) and row[keyed[end + 1]] == row[keyed[pos]]:
                end += 1
            for k in range(pos, end + 1):
                ranks[keyed[k]] = (pos + end) / 2.0 + 1.0
            pos = end + 1
        out.append(ranks)
    return out


@dataclass(frozen=True)
class Omnibus:
    """Friedman's test over treatments (strategies) x blocks (seeds)."""

    statistic: float
    p_value: float
    n_strategies: int
    n_seeds: int
    test: str = "friedman"

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "test": self.test,
            "statistic": self.statistic,
            "p_value": self.p_value,
            "n_strategies": self.n_strategies,
            "n_seeds": self.n_seeds,
        }


def friedman(matrix: Sequence[Sequence[float]]) -> Omnibus:
    """Friedman's chi-square test (SciPy's ``friedmanchisquare``, tie-corrected) on ``matrix[seed][strategy]``.

    Raises:
        ValueError: fewer than 3 strategies or 2 seeds, or rows of different lengths.
    """
    from scipy.stats import friedmanchisquare

    n_seeds = len(matrix)
    n_strategies = len(matrix[0]) if matrix else 0
    if n_strategies < 3 or n_seeds < 2:
        raise ValueError(
            f"Friedman's test needs at least 3 strategies and 2 seeds, got {n_strategies} strategies x {n_seeds} seeds."
        )
    if any(len(row) != n_strategies for row in matrix):
        raise ValueError("Friedman's test needs one value per strategy on every seed; got rows of different lengths.")
    columns = [[row[j] for row in matrix] for j in range(n_strategies)]
    if all(len(set(row)) == 1 for row in matrix):  # no variation within any seed: no evidence of any effect
        return Omnibus(0.0, 1.0, n_strategies, n_seeds)
    statistic, p_value = friedmanchisquare(*columns)
    return Omnibus(float(statistic), float(p_value), n_strategies, n_seeds)
