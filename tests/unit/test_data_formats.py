"""Readers for every schema (fixtures in tests/fixtures/data) and every error message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arkd.data import Example, format_prompt, load_examples, write_jsonl

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def test_raw_dolly_schema():
    examples = load_examples(FIXTURES / "dolly_raw.jsonl")
    raw = _rows("dolly_raw.jsonl")
    assert len(examples) == len(raw) == 10
    for ex, row in zip(examples, raw):
        assert ex.instruction == row["instruction"]
        assert ex.input == row["context"]
        assert ex.references == [row["response"]]
        assert ex.topic == row["category"]
        assert ex.prompt == format_prompt(row["instruction"], row["context"])
    assert "### Input:" not in examples[1].prompt  # empty context: the no-input template
    assert examples[4].response == "Red\nGreen\nBlue"


def test_explicit_dolly_format_equals_auto_detection():
    assert load_examples(FIXTURES / "dolly_raw.jsonl", format="dolly") == load_examples(FIXTURES / "dolly_raw.jsonl")


def test_minillm_schema_with_newline_marker():
    examples = load_examples(FIXTURES / "minillm_dolly.jsonl")
    assert [ex.topic for ex in examples] == ["closed_qa", None, None]
    legacy = examples[2]
    assert legacy.instruction == "Write two lines\nabout the sea."
    assert legacy.references == ["Waves roll in.\nGulls cry."]
    assert legacy.prompt == format_prompt("Write two lines\nabout the sea.")
    assert "<n>" not in legacy.prompt


def test_sni_schema_keeps_every_reference():
    examples = load_examples(FIXTURES / "sni.jsonl")
    assert examples[0].references == ["Cuts fear for vulnerable students", "East Sussex cuts"]
    assert examples[0].response == "Cuts fear for vulnerable students"
    assert examples[1].input == "[Paris, capital of, France]\n[France, in, Europe]"
    assert examples[0].topic == "task1358_xlsum_title_generation"


def test_unni_schema():
    examples = load_examples(FIXTURES / "unni.jsonl", format="minillm")
    assert [ex.references for ex in examples] == [[row["output"]] for row in _rows("unni.jsonl")]


def test_plain_jsonl_with_configured_field_names():
    examples = load_examples(
        FIXTURES / "plain.jsonl", instruction_key="question", input_key=None, output_key="answer", topic_key="tag"
    )
    assert examples[0] == Example(
        instruction="What is two plus two?",
        input="",
        references=["Four."],
        prompt=format_prompt("What is two plus two?"),
        topic="math",
    )
    assert examples[1].references == ["tac"]


def test_json_list_file():
    examples = load_examples(FIXTURES / "alpaca.json")
    assert [ex.references for ex in examples] == [["large"], ["5"]]
    assert examples[1].prompt == format_prompt("Add the numbers.", "2 + 3")


def test_limit_reads_the_first_rows():
    assert [ex.instruction for ex in load_examples(FIXTURES / "dolly_raw.jsonl", limit=2)] == [
        row["instruction"] for row in _rows("dolly_raw.jsonl")[:2]
    ]


def test_write_then_read_round_trip(tmp_path):
    examples = load_examples(FIXTURES / "sni.jsonl") + load_examples(FIXTURES / "dolly_raw.jsonl")
    path = write_jsonl(examples, tmp_path / "sub" / "out.jsonl")
    assert load_examples(path) == examples
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert isinstance(first["output"], list) and first["prompt"] == examples[0].prompt


def test_blank_lines_are_skipped_and_rows_counted(tmp_path):
    path = tmp_path / "gaps.jsonl"
    row = {"instruction": "a", "input": "", "output": "b"}
    path.write_text("\n" + json.dumps(row) + "\n\n" + json.dumps({"instruction": "c", "input": ""}) + "\n")
    with pytest.raises(ValueError, match=r"gaps\.jsonl, row 2 \(line 4\): missing field 'output'"):
        load_examples(path)


# --- errors -------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, lines: list[str], name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_line_names_the_file_and_line(tmp_path):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    path = _write(tmp_path, [good, good, '{"instruction": "a", "input": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: malformed JSON .*expected one JSON object per line"):
        load_examples(path)


def test_non_object_line(tmp_path):
    path = _write(tmp_path, ['["a", "b"]'])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: expected a JSON object per line, got list"):
        load_examples(path)


@pytest.mark.parametrize(
    ("fmt", "row", "missing"),
    [
        ("minillm", {"instruction": "a", "output": "b"}, "input"),
        ("minillm", {"input": "a", "output": "b"}, "instruction"),
        ("minillm", {"instruction": "a", "input": ""}, "output"),
        ("dolly", {"instruction": "a", "response": "b"}, "context"),
        ("dolly", {"instruction": "a", "context": ""}, "response"),
    ],
)
def test_missing_field_names_the_field_and_row(tmp_path, fmt, row, missing):
    good = {"instruction": "x", "input": "", "output": "y", "context": "", "response": "y"}
    path = _write(tmp_path, [json.dumps(good), json.dumps(row)])
    with pytest.raises(ValueError, match=rf"bad\.jsonl, row 2 \(line 2\): missing field '{missing}'"):
        load_examples(path, format=fmt)


def test_missing_configured_field(tmp_path):
    path = _write(tmp_path, [json.dumps({"question": "q"})])
    with pytest.raises(ValueError, match=r"row 1 \(line 1\): missing field 'answer' \(reference output\)"):
        load_examples(path, instruction_key="question", input_key=None, output_key="answer")


@pytest.mark.parametrize(
    ("output", "described"),
    [([], "an empty list"), ([1, 2], "a list with non-string items"), (3, "int"), (None, "NoneType")],
)
def test_bad_output_type(tmp_path, output, described):
    path = _write(tmp_path, [json.dumps({"instruction": "a", "input": "", "output": output})])
    with pytest.raises(ValueError, match=rf"row 1 \(line 1\): field 'output' must be a string or a non-empty list of "
                       rf"strings, got {described}"):  # fmt: skip
        load_examples(path)


def test_bad_instruction_type(tmp_path):
    path = _write(tmp_path, [json.dumps({"instruction": 5, "input": "", "output": "b"})])
    with pytest.raises(ValueError, match=r"row 1 \(line 1\): field 'instruction' must be a string, got int"):
        load_examples(path)


def test_null_input_reads_as_empty(tmp_path):
    path = _write(tmp_path, [json.dumps({"instruction": "a", "input": None, "output": "b"})])
    assert load_examples(path)[0].prompt == format_prompt("a")


def test_prompt_that_differs_from_the_template(tmp_path):
    row = {"instruction": "a", "input": "", "output": "b", "prompt": format_prompt("a") + " "}
    path = _write(tmp_path, [json.dumps(row)])
    at = len(format_prompt("a"))  # the extra space comes right after the template's end
    with pytest.raises(ValueError, match=rf"row 1 \(line 1\): field 'prompt' differs from the protocol template .*"
                       rf"first difference at character {at}\)"):  # fmt: skip
        load_examples(path)
    assert load_examples(path, verify_prompt=False)[0].prompt == format_prompt("a") + " "


def test_empty_file_is_an_error(tmp_path):
    path = _write(tmp_path, ["", "   "])
    with pytest.raises(ValueError, match=r"bad\.jsonl: no examples found; expected at least one row"):
        load_examples(path)


def test_empty_json_list_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="no examples found"):
        load_examples(path)


def test_unknown_schema(tmp_path):
    path = _write(tmp_path, [json.dumps({"q": "a", "a": "b"})])
    with pytest.raises(ValueError, match=r"row 1 \(line 1\): cannot tell the schema from the fields \['a', 'q'\]"):
        load_examples(path)


def test_unknown_format_and_bad_limit():
    with pytest.raises(ValueError, match="unknown data format 'csv'; expected one of auto, dolly, minillm, jsonl"):
        load_examples(FIXTURES / "unni.jsonl", format="csv")
    with pytest.raises(ValueError, match="limit must be a positive number of rows, got 0"):
        load_examples(FIXTURES / "unni.jsonl", limit=0)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="is a directory; expected a .jsonl or .json file"):
        load_examples(tmp_path)


def test_hub_name_failure_is_one_clear_sentence(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"could not load the Hugging Face dataset 'someone/dolly' \(split 'train'\): "
                       r"ConnectionError: no network"):  # fmt: skip
        load_examples("someone/dolly")


def test_hub_rows_go_through_the_same_readers(monkeypatch):
    import datasets

    raw = _rows("dolly_raw.jsonl")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return raw

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("databricks/databricks-dolly-15k")
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert examples == load_examples(FIXTURES / "dolly_raw.jsonl")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    bad = good.encode().replace(b'"b"', b'"\xff b"')
    if suffix == ".jsonl":
        data = good.encode() + b"\n" + good.encode() + b"\n" + bad + b"\n"
    else:
        data = b"[" + good.encode() + b",\n" + good.encode() + b",\n" + bad + b"\n]\n"
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(data)
    column = bad.index(b"\xff") + 1
    with pytest.raises(
        ValueError, match=rf"rows\{suffix}, line 3: invalid UTF-8 byte 0xff at byte {column} of the line"
    ):
        load_examples(path)
