"""Friedman's omnibus test, Holm's correction and per-seed ranks (arkd.evaluation.stats) against hand computations."""

from __future__ import annotations

import math

import pytest

from arkd.evaluation.stats import (
    friedman,
    holm_adjust,
    holm_levels,
    paired_t_p_value,
    ranks_within_blocks,
    student_t_cdf,
)


def test_friedman_matches_the_textbook_formula_without_ties():
    # 4 seeds x 3 strategies, no ties within a seed
    matrix = [[1.0, 2.0, 3.0], [2.0, 1.0, 3.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]]
    n, k = 4, 3
    rank_sums = [1 + 2 + 1 + 1, 2 + 1 + 3 + 2, 3 + 3 + 2 + 3]  # ranks ascending, as the formula uses
    chi2 = 12.0 / (n * k * (k + 1)) * sum(r * r for r in rank_sums) - 3 * n * (k + 1)
    result = friedman(matrix)
    assert result.statistic == pytest.approx(chi2)  # 4.5
    assert result.p_value == pytest.approx(math.exp(-chi2 / 2))  # chi-square with 2 df: survival exp(-x/2)
    assert result.to_dict() == {
        "test": "friedman",
        "statistic": result.statistic,
        "p_value": result.p_value,
        "n_strategies": 3,
        "n_seeds": 4,
    }


def test_friedman_without_any_variation_and_bad_shapes():
    assert friedman([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]).p_value == 1.0
    with pytest.raises(ValueError, match="at least 3 strategies and 2 seeds"):
        friedman([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match="different lengths"):
        friedman([[1.0, 2.0, 3.0], [1.0, 2.0]])


def test_holm_adjust_and_levels_hand_computed():
    p = [0.01, 0.04, 0.03, 0.2]
    # sorted 0.01, 0.03, 0.04, 0.2 -> 4*0.01 = 0.04, 3*0.03 = 0.09, max(0.09, 2*0.04) = 0.09, max(0.09, 0.2) = 0.2
    assert holm_adjust(p) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm_levels(p, 0.05) == pytest.approx([0.05 / 4, 0.05 / 2, 0.05 / 3, 0.05])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = holm_adjust([math.nan, 0.02])
    assert math.isnan(adjusted[0]) and adjusted[1] == pytest.approx(0.02)


def test_paired_t_p_value_and_ranks():
    a, b = [3.0, 5.0, 4.0], [1.0, 2.0, 3.0]  # differences 2, 3, 1: mean 2, sd 1, t = 2 / (1 / sqrt 3)
    t = 2.0 * math.sqrt(3.0)
    assert paired_t_p_value(a, b) == pytest.approx(2 * (1 - student_t_cdf(t, 2)))
    assert paired_t_p_value([1.0, 2.0], [1.0, 2.0]) == 1.0
    assert ranks_within_blocks([[3.0, 1.0, 3.0, 2.0]]) == [[1.5, 4.0, 1.5, 3.0]]
    assert ranks_within_blocks([[3.0, 1.0, 2.0]], higher_is_better=False) == [[3.0, 1.0, 2.0]]
