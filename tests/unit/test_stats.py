"""Statistics for strategy comparisons, against closed forms of Student's t and a hand-computed paired interval."""

from __future__ import annotations

import math
from statistics import NormalDist, stdev

import pytest

from arkd.evaluation.stats import mean_std, paired_difference, student_t_cdf, student_t_quantile


@pytest.mark.parametrize("t", [-7.5, -1.3, -0.2, 0.0, 0.4, 2.0, 30.0])
def test_t_cdf_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has the closed form 1/2 + t / (2 sqrt(2 + t^2)).
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize("p", [0.025, 0.1, 0.5, 0.9, 0.975, 0.995])
def test_t_quantile_matches_closed_forms_and_normal_limit(p):
    assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-8, abs=1e-9)
    assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-8, abs=1e-9)
    assert student_t_quantile(p, 1e5) == pytest.approx(NormalDist().inv_cdf(p), abs=1e-4)


def test_t_quantile_table_values():
    # Two-sided 95% critical values of common tables.
    for df, expected in [(3, 3.182446305), (4, 2.776445105), (9, 2.262157163), (30, 2.042272456)]:
        assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-8)


def test_paired_difference_by_hand():
    a, b = [24.0, 25.5, 23.0, 26.0], [23.0, 24.0, 23.5, 24.5]
    diffs = [1.0, 1.5, -0.5, 1.5]
    mean, sd = sum(diffs) / 4, stdev(diffs)
    half = 3.182446305 * sd / 2.0
    res = paired_difference(a, b)
    assert res.mean == pytest.approx(mean)
    assert res.std == pytest.approx(sd)
    assert (res.low, res.high) == pytest.approx((mean - half, mean + half), abs=1e-8)
    assert res.n == 4 and not res.significant  # the interval covers 0


def test_paired_difference_significant_and_single_pair():
    assert paired_difference([2.0, 2.1, 2.2], [1.0, 1.05, 1.1]).significant
    single = paired_difference([1.0], [0.0])
    assert single.mean == 1.0 and math.isnan(single.low) and not single.significant


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one score per seed on both sides, got 2 and 3"):
        paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        mean_std([])
    assert mean_std([3.0]) == (3.0, 0.0)
