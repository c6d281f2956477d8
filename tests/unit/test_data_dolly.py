"""The Dolly preparation (on a raw-schema fixture) and scripts/prepare_data.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from arkd.data import format_prompt, load_examples, prepare_dolly

ROOT = Path(__file__).resolve().parent.parent.parent
RAW = ROOT / "tests" / "fixtures" / "data" / "dolly_raw.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    from arkd.models import build_tiny_tokenizer

    texts = [json.loads(line)["instruction"] for line in RAW.read_text().splitlines()] + [format_prompt("a", "b")]
    return build_tiny_tokenizer(texts * 3, vocab_size=400)


def _prompt_lengths(tokenizer) -> list[int]:
    return [len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]) for ex in load_examples(RAW)]


def test_prepare_dolly_drops_long_prompts_and_splits(tmp_path, tokenizer):
    lengths = _prompt_lengths(tokenizer)
    limit = 200
    long_rows = [i for i, n in enumerate(lengths) if n > limit]
    assert long_rows == [3]  # the fixture's ~400-word context
    report = prepare_dolly(RAW, tokenizer, tmp_path, seed=0, n_validation=3, n_test=2, max_prompt_length=limit)
    assert (report.raw, report.dropped_long_prompts, report.longest_prompt) == (10, 1, max(lengths))
    assert report.sizes == {"test": 2, "valid": 3, "train": 4}
    splits = {name: load_examples(tmp_path / f"{name}.jsonl") for name in ("train", "valid", "test")}
    raw = load_examples(RAW)
    kept = [ex for i, ex in enumerate(raw) if i not in long_rows]
    together = splits["test"] + splits["valid"] + splits["train"]
    assert sorted(ex.instruction for ex in together) == sorted(ex.instruction for ex in kept)
    for ex in together:
        assert ex.topic is not None and ex.prompt == format_prompt(ex.instruction, ex.input)
    row = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[0])
    assert set(row) == {"instruction", "input", "output", "prompt", "topic"}
    assert "dropped with prompts over the limit" in report.summary()


def test_prepare_dolly_split_depends_only_on_the_seed(tmp_path, tokenizer):
    def test_rows(seed, out):
        prepare_dolly(RAW, tokenizer, out, seed=seed, n_validation=3, n_test=3, max_prompt_length=200)
        return (out / "test.jsonl").read_text()

    assert test_rows(5, tmp_path / "a") == test_rows(5, tmp_path / "b")
    assert test_rows(5, tmp_path / "a") != test_rows(6, tmp_path / "c")


def test_prepare_dolly_too_few_rows(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="9 rows left after dropping 1 long prompts; expected more than n_validation"):
        prepare_dolly(RAW, tokenizer, tmp_path, n_validation=5, n_test=4, max_prompt_length=200)


def _script():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_dolly_with_a_local_tokenizer(tmp_path, tokenizer, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    status = _script().main(
        ["dolly", "--source", str(RAW), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"),
         "--n-validation", "2", "--n-test", "2", "--max-prompt-length", "200"]
    )  # fmt: skip
    assert status == 0
    assert "1 dropped with prompts over the limit" in capsys.readouterr().out
    assert len(load_examples(tmp_path / "out" / "train.jsonl")) == 5


def test_script_synthetic(tmp_path, capsys):
    status = _script().main(["synthetic", "--out", str(tmp_path), "--n-train", "30", "--n-validation", "5",
                             "--n-test", "5", "--families", "add", "reverse"])  # fmt: skip
    assert status == 0
    assert {ex.topic for ex in load_examples(tmp_path / "train.jsonl")} == {"add", "reverse"}


def test_script_synthetic_test_split_by_family(tmp_path, capsys):
    status = _script().main(["synthetic", "--out", str(tmp_path), "--n-train", "30", "--n-validation", "4",
                             "--n-test", "9", "--families", "add", "reverse", "sort", "--test-by-family"])  # fmt: skip
    assert status == 0
    test = load_examples(tmp_path / "test.jsonl")
    parts = {p.stem: load_examples(p) for p in (tmp_path / "test_by_family").glob("*.jsonl")}
    assert set(parts) == {"add", "reverse", "sort"}
    assert all({ex.topic for ex in rows} == {family} for family, rows in parts.items())
    # The files partition the test split: every row once, in its original order within a family.
    assert sum(len(rows) for rows in parts.values()) == len(test) == 9
    for family, rows in parts.items():
        assert [ex.prompt for ex in rows] == [ex.prompt for ex in test if ex.topic == family]
    assert "test/sort:" in capsys.readouterr().out


def test_script_reports_errors_in_one_sentence(tmp_path, capsys):
    status = _script().main(["dolly", "--source", str(tmp_path / "missing.jsonl"), "--tokenizer", str(tmp_path),
                             "--out", str(tmp_path / "out")])  # fmt: skip
    assert status == 1
    assert capsys.readouterr().err.startswith("prepare_data: could not load a tokenizer from")
