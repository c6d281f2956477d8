"""Readers for the instruction-data formats arkd uses, all producing :class:`~arkd.data.example.Example` rows.

Schemas (a row's fields; ``format="auto"`` tells them apart from the first row):

- ``"dolly"``: the raw ``databricks/databricks-dolly-15k`` rows: ``instruction``, ``context``, ``response``,
  ``category``.
- ``"minillm"``: the processed JSONL files of the MiniLLM protocol (Dolly, S-NI, UnNI): ``instruction``, ``input``,
  ``output`` (a string, or a list of references for S-NI), optional ``prompt`` (checked against the template) and
  ``topic``.
- ``"jsonl"``: any JSONL with configurable field names (``instruction_key``, ``input_key``, ``output_key``,
  ``topic_key``, ``prompt_key``).

A source is a local ``.jsonl`` file (one JSON object per line), a ``.json`` file holding a list of objects, or a
Hugging Face dataset name (read with ``datasets.load_dataset(source, split=split)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from arkd.data.example import Example
from arkd.data.template import decode_newlines, format_prompt

FORMATS = ("auto", "dolly", "minillm", "jsonl")


@dataclass(frozen=True)
class FieldNames:
    """Which field of a row holds each part of an :class:`Example` (None: the schema has no such field)."""

    instruction: str
    input: str | None
    output: str
    topic: str | None = None
    prompt: str | None = None


DOLLY_FIELDS = FieldNames(instruction="instruction", input="context", output="response", topic="category")
MINILLM_FIELDS = FieldNames(instruction="instruction", input="input", output="output", topic="topic", prompt="prompt")


def load_examples(
    source: str | os.PathLike,
    *,
    format: str = "auto",  # noqa: A002 - the natural option name
    split: str = "train",
    instruction_key: str | None = None,
    input_key: str | None = "input",
    output_key: str | None = None,
    topic_key: str | None = None,
    prompt_key: str | None = None,
    verify_prompt: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Read instruction rows from a local file or a Hugging Face dataset.

    Args:
        source: a ``.jsonl`` / ``.json`` file, or a Hugging Face dataset name such as
            ``"databricks/databricks-dolly-15k"``.
        format: ``"auto"`` (from the first row's fields, or ``"jsonl"`` when a field name is given),
            ``"dolly"``, ``"minillm"`` or ``"jsonl"``.
        split: the split to read from a Hugging Face dataset (ignored for local files).
        instruction_key: ``"jsonl"`` only: the instruction field (default ``"instruction"``).
        input_key: ``"jsonl"`` only: the input field, or None when rows have no input (then input is "").
        output_key: ``"jsonl"`` only: the reference field, a string or a list of strings (default ``"output"``).
        topic_key: ``"jsonl"`` only: an optional topic field.
        prompt_key: ``"jsonl"`` only: an optional field holding the prompt (checked like MiniLLM's ``prompt``).
        verify_prompt: where a row carries its own prompt, require it to equal :func:`format_prompt` of its
            instruction and input (after ``"<n>"`` decoding); False keeps the file's prompts unchecked.
        limit: read at most this many rows (the protocol scores the first 10,000 UnNI rows).

    Returns:
        The rows as :class:`Example` objects, in file order; ``"<n>"`` markers are decoded to newlines.

    Raises:
        FileNotFoundError: a path-like source that does not exist.
        ValueError: malformed JSON (names the file and the line), a missing or mistyped field (names the field
            and the row), a prompt that differs from the template, an unknown format, or no rows at all.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown data format '{format}'; expected one of {', '.join(FORMATS)}")
    custom = any(k is not None for k in (instruction_key, output_key, topic_key, prompt_key))
    if custom and format == "auto":
        format = "jsonl"
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows, got {limit}")
    name, rows = _open_rows(source, split)
    fields: FieldNames | None = None
    if format == "dolly":
        fields = DOLLY_FIELDS
    elif format == "minillm":
        fields = MINILLM_FIELDS
    elif format == "jsonl":
        fields = FieldNames(
            instruction=instruction_key or "instruction",
            input=input_key,
            output=output_key or "output",
            topic=topic_key,
            prompt=prompt_key,
        )
    examples: list[Example] = []
    for where, row in rows:
        if fields is None:
            fields = _detect_fields(row, f"{name}, {where}")
        examples.append(_parse_row(row, fields, f"{name}, {where}", verify_prompt))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"{name}: no examples found; expected at least one row")
    return examples


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> Path:
    """Write examples as MiniLLM-schema JSONL (instruction, input, output, prompt, topic), one row a line.

    Returns:
        The path written; ``load_examples`` reads it back to equal examples.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_row(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _open_rows(source: str | os.PathLike, split: str) -> tuple[str, Iterator[tuple[str, dict]]]:
    """Return a display name and an iterator of (``"row N (line L)"``, row dict) for a file or a Hub dataset."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".json":
            return str(path), _json_rows(path)
        return str(path), _jsonl_rows(path)
    text = str(source)
    if path.is_dir():
        raise ValueError(f"{text} is a directory; expected a .jsonl or .json file, or a Hugging Face dataset name")
    if path.suffix in (".jsonl", ".json") or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(
            f"{text}: no such file; expected a .jsonl or .json file, or a Hugging Face dataset name"
        )
    return f"Hugging Face dataset '{text}' (split '{split}')", _hub_rows(text, split)


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> ValueError:
    """One sentence naming the file, the line and the byte of an invalid UTF-8 sequence in ``data`` (whose first
    line is line ``first_line`` of the file)."""
    newline = b"\n"
    line_start = data.rfind(newline, 0, err.start) + 1
    line = first_line + data.count(newline, 0, err.start)
    return ValueError(
        f"{path}, line {line}: invalid UTF-8 byte 0x{data[err.start]:02x} at byte {err.start - line_start + 1} of "
        "the line; expected a UTF-8 text file"
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    row_number = 0
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(path, raw, err, first_line=line_number) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {line_number}: malformed JSON ({err.msg} at column {err.colno}); "
                    "expected one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}, line {line_number}: expected a JSON object per line, got {type(row).__name__}"
                )
            row_number += 1
            yield f"row {row_number} (line {line_number})", row


def _json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(path, raw, err) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: malformed JSON ({err.msg}); expected a list of objects") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")
        yield f"row {i}", row


def _hub_rows(name: str, split: str) -> Iterator[tuple[str, dict]]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, split=split)
    except Exception as err:  # network, unknown name, unknown split: one sentence with the cause
        raise ValueError(
            f"could not load the Hugging Face dataset '{name}' (split '{split}'): {type(err).__name__}: {err}; "
            "expected a reachable dataset name or a local .jsonl file"
        ) from err
    for i, row in enumerate(dataset, start=1):
        yield f"row {i}", dict(row)


def _detect_fields(row: dict, where: str) -> FieldNames:
    keys = set(row)
    if {"instruction", "context", "response"} <= keys:
        return DOLLY_FIELDS
    if {"instruction", "output"} <= keys:
        return MINILLM_FIELDS
    raise ValueError(
        f"{where}: cannot tell the schema from the fields {sorted(keys)}; expected Dolly "
        "(instruction/context/response/category) or MiniLLM (instruction/input/output), or pass format='jsonl' "
        "with instruction_key / input_key / output_key"
    )


def _get(row: dict, key: str, where: str, role: str) -> object:
    if key not in row:
        raise ValueError(f"{where}: missing field '{key}' ({role}); the row has fields {sorted(row)}")
    return row[key]


def _text(value: object, key: str, where: str, *, allow_none: bool = False) -> str:
    if value is None and allow_none:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return decode_newlines(value)


def _references(value: object, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [decode_newlines(value)]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [decode_newlines(v) for v in value]
    raise ValueError(f"{where}: field '{key}' must be a string or a non-empty list of strings, got {_describe(value)}")


def _describe(value: object) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else "a list with non-string items"
    return type(value).__name__


def _parse_row(row: dict, fields: FieldNames, where: str, verify_prompt: bool) -> Example:
    instruction = _text(_get(row, fields.instruction, where, "instruction"), fields.instruction, where)
    inp = ""
    if fields.input is not None:
        inp = _text(_get(row, fields.input, where, "input"), fields.input, where, allow_none=True)
    references = _references(_get(row, fields.output, where, "reference output"), fields.output, where)
    topic = None
    if fields.topic is not None and row.get(fields.topic) is not None:
        topic = str(row[fields.topic])
    expected = format_prompt(instruction, inp)
    prompt = expected
    if fields.prompt is not None and fields.prompt in row:
        prompt = _text(row[fields.prompt], fields.prompt, where)
        if verify_prompt and prompt != expected:
            at = next((i for i, (a, b) in enumerate(zip(prompt, expected)) if a != b), min(len(prompt), len(expected)))
            raise ValueError(
                f"{where}: field '{fields.prompt}' differs from the protocol template applied to the instruction "
                f"and input (first difference at character {at}); expected format_prompt(instruction, input), "
                "or pass verify_prompt=False to keep the file's prompts"
            )
    return Example(instruction=instruction, input=inp, references=references, prompt=prompt, topic=topic)
