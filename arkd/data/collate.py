"""Collators: right-padded training batches with response masks, left-padded prompt batches for generation.

A training batch is the dict of ``[B, T]`` tensors of docs/architecture.md:

- ``input_ids`` (long): prompt tokens, then response tokens and the end-of-text token, then padding;
- ``attention_mask`` (long): 1 on real tokens, 0 on padding;
- ``loss_mask`` (bool): True on the response tokens and the end-of-text token only (never the prompt, never
  padding), aligned with ``input_ids``;
- ``labels`` (long): ``input_ids`` where ``loss_mask`` is True, -100 elsewhere (what Hugging Face models expect;
  they shift internally).

The logits at position ``t`` predict token ``t + 1``; :func:`shift_for_next_token` pairs them with the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def shift_for_next_token(logits: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align next-token logits with the tokens they predict.

    Args:
        logits: ``[B, T, V]`` (or ``[B, T, ...]``) model outputs; position ``t`` predicts token ``t + 1``.
        loss_mask: ``[B, T]`` bool, True on the counted tokens of ``input_ids``.

    Returns:
        ``logits[:, :-1]`` (``[B, T-1, V]``) and ``loss_mask[:, 1:]`` (``[B, T-1]``): row ``t`` of the first is
        the prediction of the token the second marks at ``t``.
    """
    return logits[:, :-1], loss_mask[:, 1:]


def _padded_length(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    longest = max(lengths)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


class TrainingCollator:
    """Right-pads ``prompt_ids + response_ids`` items into a training batch (see the module docstring).

    Args:
        pad_token_id: the id written in padded positions (GPT-2: the end-of-text id); padding is never counted,
            whatever the id, because ``attention_mask`` and ``loss_mask`` are 0 / False there.
        pad_to_multiple_of: round the padded length up to a multiple of this (None: the longest item).
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; expected the tokenizer's pad (or end-of-text) token id")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Collate items with ``prompt_ids`` and ``response_ids`` lists into ``[B, T]`` tensors."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(it["prompt_ids"]) + len(it["response_ids"]) for it in items]
        width = _padded_length(lengths, self.pad_to_multiple_of)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        loss_mask = torch.zeros((len(items), width), dtype=torch.bool)
        for row, (item, length) in enumerate(zip(items, lengths)):
            n_prompt = len(item["prompt_ids"])
            input_ids[row, :length] = torch.tensor(
                list(item["prompt_ids"]) + list(item["response_ids"]), dtype=torch.long
            )
            attention_mask[row, :length] = 1
            loss_mask[row, n_prompt:length] = True
        labels = input_ids.masked_fill(~loss_mask, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "labels": labels}


class PromptCollator:
    """Left-pads prompts for generation; the prompts' texts, references and indices come along.

    Returns a dict with ``input_ids`` and ``attention_mask`` (``[B, P]`` long, padding on the left so that every
    prompt ends at the last column), ``index`` (``[B]`` long: the example's position in its source list),
    ``prompts`` (list of B strings) and ``references`` (list of B lists of strings).

    Args:
        pad_token_id: the id written in padded positions.
        pad_to_multiple_of: round the padded length up to a multiple of this (None: the longest prompt).
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; expected the tokenizer's pad (or end-of-text) token id")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict]) -> dict:
        """Collate items with ``prompt_ids``, ``index``, ``prompt`` and ``references``."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(it["prompt_ids"]) for it in items]
        width = _padded_length(lengths, self.pad_to_multiple_of)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (item, length) in enumerate(zip(items, lengths)):
            input_ids[row, width - length :] = torch.tensor(list(item["prompt_ids"]), dtype=torch.long)
            attention_mask[row, width - length :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
            "prompts": [it.get("prompt", "") for it in items],
            "references": [list(it.get("references", [])) for it in items],
        }
