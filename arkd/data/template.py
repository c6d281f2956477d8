"""The prompt template of the MiniLLM evaluation protocol (Alpaca style), byte for byte.

The protocol's data files (Dolly, S-NI, UnNI as released by MiniLLM) carry the exact prompt of every row; these two
templates reproduce it. Older MiniLLM files write a newline inside a prompt or an output as the marker ``"<n>"``;
:func:`decode_newlines` turns the marker back into ``"\\n"`` (the files in ``../shared/data`` already use real
newlines, so the marker is decoded on load and never written).
"""

from __future__ import annotations

NEWLINE_MARKER = "<n>"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the protocol's field name
    """Build the protocol prompt of one row.

    Args:
        instruction: the task description.
        input: the optional context; the empty string selects the template without an ``### Input:`` section
            (as MiniLLM does for ``len(input) == 0``).

    Returns:
        The prompt, ending with ``"### Response:\\n"``; the response follows it directly.
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def decode_newlines(text: str) -> str:
    """Replace the protocol's newline marker ``"<n>"`` by a real newline."""
    return text.replace(NEWLINE_MARKER, "\n")
