"""Tokenization of prompt / response pairs with the protocol's length limits.

Conventions (MiniLLM protocol, GPT-2 tokenizer):

- The prompt and the response are tokenized **separately** (``add_special_tokens=False``, so no BOS unless
  ``add_bos=True``) and concatenated, so the prompt tokens a model is trained on are exactly the ones it is
  later prompted with. Evaluation encodes prompts with the tokenizer's own special tokens
  (``arkd.evaluation.generation.encode_prompts``), so ``add_bos`` must follow :func:`tokenizer_adds_bos` (the
  trainer's ``data.add_bos: auto``): False for GPT-2 and Qwen2.5, True for Llama-3.
  The end-of-text token ends every response.
- A prompt longer than ``max_prompt_length`` (256) tokens is *counted* and then dropped (training data: the Dolly
  rule), truncated (evaluation) or reported as an error, per ``overlong_prompt``. Truncation keeps the first
  ``max_prompt_length`` tokens by default, as MiniLLM's ``PromptDataset`` does (``prompt[:max_prompt_length]``);
  ``truncation_side="left"`` keeps the last tokens instead, so the ``### Response:`` cue survives.
- The whole sequence is at most ``max_length`` (512) tokens: the response (with its end-of-text token) is cut at
  the end to fit; a cut response has no end-of-text token, as in MiniLLM's ``input_ids[:max_length]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from arkd.data.example import Example
from arkd.progress import progress_bar

logger = logging.getLogger("arkd.data")

OVERLONG_PROMPT = ("drop", "truncate", "error")


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first when it adds its own special tokens (Llama-3: yes; GPT-2,
    whose BOS and EOS are both ``<|endoftext|>`` but which adds nothing, and Qwen2.5: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos and plain[:1] != [bos]


def resolve_add_bos(value, tokenizer) -> bool:
    """``data.add_bos``: ``"auto"`` is :func:`tokenizer_adds_bos` (what evaluation prompts get), else the bool."""
    if value == "auto":
        return tokenizer_adds_bos(tokenizer)
    if isinstance(value, bool):
        return value
    raise ValueError(f"data.add_bos must be auto, true or false, got {value!r}")


TRUNCATION_SIDES = ("right", "left")


@dataclass
class TokenizedExample:
    """Token ids of one example.

    Attributes:
        index: position of the example in the list it was tokenized from (dropped rows leave gaps).
        prompt_ids: the prompt's tokens, at most ``max_prompt_length``.
        response_ids: the response's tokens followed by the end-of-text token (cut to fit ``max_length``).
    """

    index: int
    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class TokenizationReport:
    """What tokenization did to a set of examples; nothing is dropped or cut without being counted here."""

    total: int = 0
    kept: int = 0
    prompts_over_limit: int = 0
    dropped: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    longest_prompt: int = 0
    max_prompt_length: int = 256
    max_length: int = 512

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"{self.kept} of {self.total} examples kept; {self.prompts_over_limit} prompts over "
            f"{self.max_prompt_length} tokens (longest {self.longest_prompt}): {self.dropped} dropped, "
            f"{self.prompts_truncated} truncated; {self.responses_truncated} responses cut to fit {self.max_length} "
            "tokens"
        )


def _check_limits(max_prompt_length: int, max_length: int, overlong_prompt: str, truncation_side: str) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"expected 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length} and "
            f"max_length={max_length}"
        )
    if overlong_prompt not in OVERLONG_PROMPT:
        raise ValueError(f"overlong_prompt must be one of {', '.join(OVERLONG_PROMPT)}, got '{overlong_prompt}'")
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {', '.join(TRUNCATION_SIDES)}, got '{truncation_side}'")


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    *,
    max_prompt_length: int = 256,
    max_length: int = 512,
    overlong_prompt: str = "drop",
    truncation_side: str = "right",
    add_bos: bool = False,
    progress: bool = False,
    batch_size: int = 1000,
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Tokenize examples (prompt and ``references[0]``) under the length limits.

    Args:
        examples: the rows.
        tokenizer: a Hugging Face tokenizer with an end-of-text (``eos_token_id``) token.
        max_prompt_length: the most prompt tokens (256 in the protocol).
        max_length: the most tokens of prompt plus response (512 in the protocol).
        overlong_prompt: what to do with a longer prompt: ``"drop"`` the row (training), ``"truncate"`` it
            (evaluation) or raise (``"error"``). Either way it is counted in the report and logged.
        truncation_side: ``"right"`` keeps the first tokens (MiniLLM), ``"left"`` the last ones.
        add_bos: prepend the tokenizer's BOS token to the prompt (off in the GPT-2 protocol).
        progress: show a progress bar.
        batch_size: rows per tokenizer call.

    Returns:
        The tokenized rows (in input order, dropped rows left out) and the report.

    Raises:
        ValueError: bad limits, a tokenizer without an end-of-text token, or an overlong prompt with
            ``overlong_prompt="error"`` (naming the row and both lengths).
    """
    _check_limits(max_prompt_length, max_length, overlong_prompt, truncation_side)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token (eos_token_id is None); expected one to end responses")
    bos: list[int] = []
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token (bos_token_id is None)")
        bos = [tokenizer.bos_token_id]
    report = TokenizationReport(total=len(examples), max_prompt_length=max_prompt_length, max_length=max_length)
    items: list[TokenizedExample] = []
    starts = range(0, len(examples), batch_size)
    for start in progress_bar(starts, desc="tokenizing", unit="batch", disable=not progress):
        chunk = examples[start : start + batch_size]
        prompts = tokenizer([ex.prompt for ex in chunk], add_special_tokens=False)["input_ids"]
        responses = tokenizer([ex.response for ex in chunk], add_special_tokens=False)["input_ids"]
        for offset, (prompt_ids, response_ids) in enumerate(zip(prompts, responses)):
            index = start + offset
            prompt_ids = bos + list(prompt_ids)
            if len(prompt_ids) > max_prompt_length:
                report.prompts_over_limit += 1
                report.longest_prompt = max(report.longest_prompt, len(prompt_ids))
                if overlong_prompt == "error":
                    raise ValueError(
                        f"example {index}: the prompt has {len(prompt_ids)} tokens, over max_prompt_length="
                        f"{max_prompt_length}; expected overlong_prompt='drop' or 'truncate' to handle it"
                    )
                if overlong_prompt == "drop":
                    report.dropped += 1
                    continue
                report.prompts_truncated += 1
                if truncation_side == "right":
                    prompt_ids = prompt_ids[:max_prompt_length]
                else:
                    prompt_ids = bos + prompt_ids[len(prompt_ids) - max_prompt_length + len(bos) :]
            report.longest_prompt = max(report.longest_prompt, len(prompt_ids))
            full_response = list(response_ids) + [eos]
            room = max_length - len(prompt_ids)
            if len(full_response) > room:
                report.responses_truncated += 1
                full_response = full_response[:room]
            items.append(TokenizedExample(index=index, prompt_ids=prompt_ids, response_ids=full_response))
    report.kept = len(items)
    if report.prompts_over_limit or report.responses_truncated:
        logger.warning("tokenization: %s", report.summary())
    return items, report
