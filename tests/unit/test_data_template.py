"""The protocol template, byte for byte, and the real protocol files (when ../shared/data is present)."""

from __future__ import annotations

import json

import pytest

from arkd.data import decode_newlines, format_prompt, load_examples

WITH_INPUT_BY_HAND = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
    "### Input:\n2 + 3\n\n### Response:\n"
)
NO_INPUT_BY_HAND = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a colour.\n\n### Response:\n"
)


def test_format_prompt_with_input_matches_hand_written_string():
    assert format_prompt("Add the numbers.", "2 + 3") == WITH_INPUT_BY_HAND


def test_format_prompt_without_input_matches_hand_written_string():
    assert format_prompt("Name a colour.") == NO_INPUT_BY_HAND
    assert format_prompt("Name a colour.", "") == NO_INPUT_BY_HAND


def test_format_prompt_keeps_braces_and_newlines_verbatim():
    prompt = format_prompt("Fill {x} in.", "a\nb {0}")
    assert "### Instruction:\nFill {x} in.\n\n### Input:\na\nb {0}\n\n### Response:\n" in prompt
    assert prompt.endswith("### Response:\n")


def test_whitespace_only_input_still_uses_the_input_template():
    # MiniLLM tests len(input) == 0, so a single space is an input.
    assert "### Input:\n \n\n" in format_prompt("Do it.", " ")


def test_decode_newlines():
    assert decode_newlines("a<n>b<n><n>c") == "a\nb\n\nc"
    assert decode_newlines("no marker") == "no marker"


PROTOCOL_FILES = {
    "dolly/minillm_dolly_test500.jsonl": (500, str),
    "dolly/minillm_dolly_valid1000.jsonl": (1000, str),
    "sni/minillm_sinst_11plus_test.jsonl": (1694, list),
    "unni/minillm_uinst_11plus_prefix107.jsonl": (107, str),
}


@pytest.mark.parametrize("name", sorted(PROTOCOL_FILES))
def test_real_protocol_files_load_and_prompts_equal_the_template(shared_data, name):
    path = shared_data / name
    rows, output_type = PROTOCOL_FILES[name]
    examples = load_examples(path)
    assert len(examples) == rows
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for ex, row in zip(examples, raw, strict=True):
        assert isinstance(row["output"], output_type)
        assert ex.prompt == format_prompt(ex.instruction, ex.input) == row["prompt"]
        expected_refs = row["output"] if isinstance(row["output"], list) else [row["output"]]
        assert ex.references == expected_refs
        assert ex.topic == row.get("topic")
