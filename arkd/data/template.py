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


# --------------------------------------------------------------------------------------------------------------------
# Chat templates (data.template: chat)

TEMPLATES = ("protocol", "chat")
_SENTINEL = "ARKD_SENTINEL_RESPONSE"


def chat_messages(instruction: str, input: str = "", response: str | None = None) -> list[dict[str, str]]:  # noqa: A002
    """A row as chat messages: the instruction (and its input, after a blank line) as the user's turn, the reference
    as the assistant's turn when given."""
    user = f"{instruction}\n\n{input}" if input else instruction
    messages = [{"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def check_chat_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer without a chat template (one sentence)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"data.template=chat but the tokenizer {name} has no chat template; expected an instruct model's "
            "tokenizer, or data.template=protocol"
        )


def end_of_turn_token(tokenizer) -> str:
    """The special token the chat template closes an assistant turn with (``<|im_end|>`` for ChatML models such as
    SmolLM2 and Qwen2.5, ``<|eot_id|>`` for Llama-3), read from the template itself.

    Raises:
        ValueError: no chat template, or an assistant turn that ends with no special token.
    """
    check_chat_tokenizer(tokenizer)
    text = tokenizer.apply_chat_template(chat_messages("x", response=_SENTINEL), tokenize=False)
    after = text[text.index(_SENTINEL) + len(_SENTINEL) :]
    special = sorted(
        {str(t) for t in tokenizer.all_special_tokens} | {str(t) for t in tokenizer.get_added_vocab()},
        key=len,
        reverse=True,
    )
    for token in special:
        if token and after.startswith(token):
            return token
    raise ValueError(
        f"the chat template ends the assistant's turn with {after[:20]!r}, not a special token; expected an "
        "end-of-turn token to stop generation at"
    )


def chat_prompt(tokenizer, instruction: str, input: str = "") -> str:  # noqa: A002
    """The chat template's rendering of the user's turn with the generation prompt (the assistant's header).

    When the tokenizer adds its BOS token itself and the template writes it too, the template's copy is removed so
    that encoding the prompt with the tokenizer's special tokens yields one BOS, as arkd's tokenization does.
    """
    check_chat_tokenizer(tokenizer)
    text = tokenizer.apply_chat_template(chat_messages(instruction, input), tokenize=False, add_generation_prompt=True)
    from arkd.data.tokenization import tokenizer_adds_bos

    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer_adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def apply_template(splits: dict, tokenizer, template: str) -> dict:
    """The splits with each row's prompt in ``template``: ``protocol`` leaves them as they are (the MiniLLM prompt);
    ``chat`` renders the model's chat template, and makes the template's end-of-turn token the tokenizer's
    end-of-text token, so that responses are trained to end with it and generation stops at it.

    Raises:
        ValueError: an unknown template, or ``chat`` for a tokenizer without a chat template.
    """
    from dataclasses import replace

    if template not in TEMPLATES:
        raise ValueError(f"data.template: got {template!r}, expected one of {', '.join(TEMPLATES)}")
    if template == "protocol":
        return splits
    eot = end_of_turn_token(tokenizer)
    if tokenizer.eos_token != eot:
        tokenizer.eos_token = eot
    return {
        name: [replace(ex, prompt=chat_prompt(tokenizer, ex.instruction, ex.input)) for ex in rows]
        for name, rows in splits.items()
    }
