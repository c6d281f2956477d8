"""Synthetic tasks: determinism, one correct answer per row (checked by an independent computation), splits."""

from __future__ import annotations

import collections
import re

import pytest

from arkd.data import format_prompt, load_examples
from arkd.data.synthetic import FAMILIES, generate_synthetic, synthetic_corpus, synthetic_splits, write_synthetic_splits

ANTONYMS = [("big", "small"), ("hot", "cold"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("happy", "sad"),
            ("high", "low"), ("light", "dark"), ("early", "late")]  # fmt: skip
SPELLING = "zero one two three four five six seven eight nine".split()


def expected_answer(family: str, instruction: str, inp: str) -> str:
    """Recompute each family's answer from the row's text alone."""
    tokens = inp.split()
    if family == "reverse":
        return " ".join(tokens[::-1])
    if family == "sort":
        return " ".join(sorted(tokens, key=lambda w: [ord(c) for c in w]))
    if family == "numsort":
        return " ".join(str(v) for v in sorted(int(t) for t in tokens))
    if family == "count":
        return f"{len(tokens)}"
    if family == "opposite":
        table = {a: b for a, b in ANTONYMS} | {b: a for a, b in ANTONYMS}
        return " ".join(table[t] for t in tokens)
    if family == "spell":
        return " ".join(SPELLING[int(t)] for t in tokens)
    if family == "add":
        left, plus, right = tokens
        assert plus == "+"
        return str(int(left) + int(right))
    if family == "double":
        return " ".join(f"{t} {t}" for t in tokens)
    if family == "ends":
        return f"{tokens[0]} {tokens[-1]}"
    if family == "countup":
        start, stop = map(int, re.fullmatch(r"Count from (\d+) to (\d+)\.", instruction).groups())
        assert inp == ""
        return " ".join(map(str, range(start, stop + 1)))
    raise AssertionError(f"no independent check for family {family}")


def test_every_family_is_checked_here():
    for family in FAMILIES:
        row = generate_synthetic(1, seed=0, families=[family])[0]
        expected_answer(family, row.instruction, row.input)  # raises for a family without a check


def test_every_answer_is_correct():
    rows = generate_synthetic(2000, seed=3)
    for row in rows:
        assert row.references == [expected_answer(row.topic, row.instruction, row.input)], row
        assert row.prompt == format_prompt(row.instruction, row.input)


def test_generation_is_deterministic_from_the_seed():
    assert generate_synthetic(200, seed=5) == generate_synthetic(200, seed=5)
    assert generate_synthetic(200, seed=5) != generate_synthetic(200, seed=6)
    assert synthetic_corpus(30, seed=1) == synthetic_corpus(30, seed=1)


def test_families_are_balanced_and_each_has_one_instruction_sentence():
    rows = generate_synthetic(1000, seed=0)
    counts = collections.Counter(row.topic for row in rows)
    assert counts == {family: 100 for family in FAMILIES}
    for family in FAMILIES:
        if family != "countup":  # its sentence carries the range
            assert len({row.instruction for row in rows if row.topic == family}) == 1
    assert len({row.instruction for row in rows if row.topic != "countup"}) == len(FAMILIES) - 1


def test_answers_are_mostly_several_words():
    rows = generate_synthetic(1000, seed=0)
    multi = sum(len(row.response.split()) > 1 for row in rows)
    assert multi >= 0.7 * len(rows)


def test_family_subset_and_errors():
    rows = generate_synthetic(10, seed=0, families=["add", "spell"])
    assert {row.topic for row in rows} == {"add", "spell"}
    with pytest.raises(ValueError, match=r"unknown synthetic families \['mul'\]"):
        generate_synthetic(10, families=["add", "mul"])
    with pytest.raises(ValueError, match="families is empty"):
        generate_synthetic(10, families=[])
    with pytest.raises(ValueError, match="n must be a positive number of rows, got 0"):
        generate_synthetic(0)


def test_splits_hold_out_validation_and_test_prompts():
    splits = synthetic_splits(600, 50, 100, seed=1)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [600, 50, 100]
    train = {row.prompt for row in splits["train"]}
    validation = {row.prompt for row in splits["validation"]}
    test = {row.prompt for row in splits["test"]}
    assert len(validation) == 50 and len(test) == 100
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert {row.topic for row in splits["test"]} == set(FAMILIES)
    assert synthetic_splits(600, 50, 100, seed=1) == splits


def test_splits_errors():
    with pytest.raises(ValueError, match="n_test must be at least 1, got 0"):
        synthetic_splits(10, 5, 0)
    with pytest.raises(ValueError, match="could only find .* distinct held-out prompts of 500"):
        synthetic_splits(10, 250, 250, families=["add"])  # 21 * 21 = 441 distinct additions


def test_written_splits_load_back(tmp_path):
    paths = write_synthetic_splits(tmp_path, n_train=40, n_validation=10, n_test=10, seed=2)
    assert sorted(paths) == ["test", "train", "validation"]
    splits = synthetic_splits(40, 10, 10, seed=2)
    for name, path in paths.items():
        assert load_examples(path) == splits[name]
