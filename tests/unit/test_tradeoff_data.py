"""The trade-off testbed's data (arkd.data.synthetic.tradeoff_splits): skewed answer distributions, every valid
answer a held-out reference, sampled training answers, no leaks."""

from __future__ import annotations

import collections
import math

import pytest

from arkd.data.synthetic import PARAPHRASES, TRADEOFF_FAMILIES, tradeoff_splits, zipf_weights


def test_zipf_weights_hand_computed():
    w = zipf_weights(3)
    total = 1 + 2**-1.5 + 3**-1.5
    assert w == pytest.approx([1 / total, 2**-1.5 / total, 3**-1.5 / total])
    assert math.isclose(sum(zipf_weights(7)), 1.0)


def test_held_out_rows_list_every_valid_answer_most_probable_first():
    splits = tradeoff_splits(300, 30, 60, seed=3)
    for ex in splits["validation"] + splits["test"]:
        words = ex.input.split()
        if ex.topic == "pick":
            assert ex.references == words  # position 1 is the mode
        elif ex.topic == "pick_two":
            k = len(words)
            assert len(ex.references) == k * (k - 1) == len(set(ex.references))
            assert ex.references[0] == f"{words[0]} {words[1]}"
            assert all(a != b for a, b in (r.split() for r in ex.references))
        else:
            noun, adjective = words
            assert ex.references == [t.format(n=noun, a=adjective) for t in PARAPHRASES]
    held = {ex.prompt for ex in splits["validation"] + splits["test"]}
    assert len(held) == 90
    assert not held & {ex.prompt for ex in splits["train"]}
    assert {ex.topic for ex in splits["test"]} == set(TRADEOFF_FAMILIES)


def test_training_answers_are_samples_of_the_skewed_distribution():
    train = tradeoff_splits(6000, 10, 10, seed=0, families=["pick"])["train"]
    ranks = collections.Counter(ex.input.split().index(ex.references[0]) for ex in train if len(ex.input.split()) == 6)
    n = sum(ranks.values())
    expected = zipf_weights(6)
    for rank in range(6):  # within 4 binomial standard deviations
        sd = math.sqrt(expected[rank] * (1 - expected[rank]) / n)
        assert abs(ranks[rank] / n - expected[rank]) < 4 * sd
    assert all(len(ex.references) == 1 for ex in train)
    pairs = tradeoff_splits(3000, 10, 10, seed=1, families=["pick_two"])["train"]
    first_two = sum(ex.references[0] == " ".join(ex.input.split()[:2]) for ex in pairs) / len(pairs)
    assert 0.15 < first_two < 0.45  # the mode of the pairs, but far from all of them


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown or no trade-off families"):
        tradeoff_splits(10, 1, 1, families=["reverse"])
    with pytest.raises(ValueError, match="n_test must be at least 1"):
        tradeoff_splits(10, 1, 0)
    with pytest.raises(ValueError, match="distinct held-out prompts"):
        tradeoff_splits(10, 400, 400, families=["paraphrase"])
