"""Rouge-L and exact match against rouge_score and a naive normalisation written here."""

from __future__ import annotations

import string

import pytest
from rouge_score import rouge_scorer

from arkd.evaluation import exact_match, exact_match_per_row, mean_x100, normalize_answer, rouge_l, rouge_l_per_row

PREDICTIONS = [
    "The cat sat on the mat.",
    "",  # empty generation
    "Running runners ran; they RUN!",
    "Café au lait, s'il vous plaît — naïve résumé",
    "Paris is the capital of France",
    "   ",
    "numbers 1, 2 and 3...",
    "日本語のテキスト and some english words",
]
REFERENCES = [
    ["A cat was sitting on the mat", "the cat sat on a mat"],
    ["anything at all"],
    ["the runner runs", "Runs"],
    ["cafe au lait s'il vous plait", "naive resume"],
    ["Paris is the capital of France."],
    ["empty"],
    ["numbers: 1 2 3", "one two three"],
    ["日本語", "english words only"],
]


def reference_rouge(predictions, references) -> float:
    """The protocol written out with rouge_score directly (LMOps minillm/rouge_metric.py's compute_metrics)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for prediction, refs in zip(predictions, references):
        total += max(scorer.score(target=r, prediction=prediction)["rougeL"].fmeasure for r in refs)
    return round(100.0 * total / len(references), 4)


def naive_normalize(text: str) -> str:
    text = text.lower()
    for ch in string.punctuation:
        text = text.replace(ch, "")
    text = text.replace("\n", " ").replace("\t", " ")
    while "  " in text:
        text = text.replace("  ", " ")
    return text.strip()


def test_rouge_l_equals_rouge_score_on_fixtures():
    assert rouge_l(PREDICTIONS, REFERENCES) == reference_rouge(PREDICTIONS, REFERENCES)
    assert 0 < rouge_l(PREDICTIONS, REFERENCES) < 100


def test_rouge_l_rows_match_rouge_score_row_by_row():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = rouge_l_per_row(PREDICTIONS, REFERENCES)
    for prediction, refs, got in zip(PREDICTIONS, REFERENCES, rows):
        expected = max(scorer.score(target=r, prediction=prediction)["rougeL"].fmeasure for r in refs)
        assert got == expected
    assert rows[1] == 0.0  # empty prediction
    assert rows[4] == 1.0  # punctuation does not count
    assert rows[0] > rouge_l_per_row([PREDICTIONS[0]], [REFERENCES[0][:1]])[0]  # the best reference is kept


def test_rouge_l_single_string_references_equal_one_element_lists():
    refs = [r[0] for r in REFERENCES]
    assert rouge_l(PREDICTIONS, refs) == rouge_l(PREDICTIONS, [[r] for r in refs])
    assert rouge_l(PREDICTIONS, refs) == reference_rouge(PREDICTIONS, [[r] for r in refs])


def test_rouge_l_stemming_and_limits():
    assert rouge_l(["the runners running"], ["the runner runs"]) == 100.0  # Porter stemming
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0
    assert rouge_l(["x"], ["x"]) == 100.0


def test_rouge_l_parallel_equals_serial():
    predictions = PREDICTIONS * 5
    references = REFERENCES * 5
    serial = rouge_l_per_row(predictions, references, workers=1)
    parallel = rouge_l_per_row(predictions, references, workers=2)
    assert parallel == serial
    assert rouge_l(predictions, references, workers=2) == reference_rouge(predictions, references)


def test_rouge_l_rounds_to_four_decimals():
    value = rouge_l(["a b c"], ["a b d e f g h"])  # F = 2 * (2/3) * (2/7) / (2/3 + 2/7) = 0.4
    assert value == 40.0
    assert mean_x100([1 / 3, 0.0, 0.0]) == round(100 / 9, 4) == 11.1111


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        (["a"], ["a", "b"], "1 rows but references has 2"),
        (["a"], [[]], "row 0 has no reference"),
        (["a"], [[3]], "a reference of row 0 is int"),
        ("abc", ["abc"], "not a single string"),
        ([], [], "at least one row"),
    ],
)
def test_rouge_l_bad_input_names_the_problem(predictions, references, message):
    with pytest.raises((TypeError, ValueError), match=message):
        rouge_l(predictions, references)


def test_normalize_answer_matches_naive_version():
    texts = ["The  Cat, sat!", "  A\tan\nthe ", "Don't stop—", "Ünïcode “quotes”", "", "x.y-z"]
    for text in texts:
        assert normalize_answer(text) == naive_normalize(text)
    assert normalize_answer("The answer is: A.") == "the answer is a"  # articles are kept
    assert normalize_answer("em—dash “curly”") == "em—dash “curly”"  # only ASCII punctuation is removed


def test_exact_match_values():
    predictions = ["Paris.", "the  answer", "Yes", "no", ""]
    references = [["paris"], ["answer", "The answer!"], ["yes sir"], ["No", "nope"], [""]]
    assert exact_match_per_row(predictions, references) == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert exact_match(predictions, references) == 80.0
    assert exact_match(["a"], ["b"]) == 0.0
    assert exact_match(["x", "y", "z"], ["x", "q", "q"]) == 33.3333
