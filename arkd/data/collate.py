"""Collators: right-padded training batches with response masks, left-padded prompt batches for generation.

A training batch is the dict of ``[B, T]`` tensors of docs/architecture.md:

- ``input_ids`` (long): prompt tokens, then response tokens and the end-of-text token, then padding;
- ``attention_mask`` (long): 1 on real tokens, 0 on padding;
- ``loss_mask`` (bool): True on the response tokens and the end-of-text token only (never the prompt, never
  padding), aligned with ``input_ids``;
- ``labels`` (long): ``input_ids`` where ``loss_mask`` is True, -100 elsewhere (what Hugging Face models expect;
  they shift internally).

The logits at position ``t`` predict token ``t + 1``; :func:`shift_for_next_token` pairs them with the mask.

A *packed* batch (``TrainingCollator(..., pack=True)``, ``data.packing=true``) holds the same items in fewer rows:
several items share a row, each with its own ``position_ids`` (``0 .. length - 1``), and the model attends only
within an item (Hugging Face builds the block-diagonal causal mask from ``position_ids`` when ``attention_mask`` is
None and no cache is used: :func:`model_inputs`). Each item's first token is never counted (no position of its row
predicts it from its own item), exactly as in an unpacked row, where nothing predicts position 0.
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


def shift_labels(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens predicted and the counted positions, aligned with :func:`shift_for_next_token`'s logits:
    ``input_ids[:, 1:]`` and ``loss_mask[:, 1:]`` as bool (``[B, T-1]`` each)."""
    return batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:].bool()


def drop_last_position(logits: torch.Tensor) -> torch.Tensor:
    """``logits[:, :-1]``: the predictions of tokens 1..T-1 (a teacher's logits next to shifted student logits)."""
    return logits[:, :-1]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, object]:
    """The keyword arguments of a model's forward for a training batch.

    An unpacked batch gives ``input_ids`` and ``attention_mask``. A packed one (it has ``position_ids``) gives
    ``input_ids``, ``position_ids``, ``attention_mask=None`` and ``use_cache=False``: Hugging Face models then mask
    attention between the items of a row (``transformers.masking_utils.find_packed_sequence_indices``; it is skipped
    when a cache exists, hence ``use_cache=False``). ``batch["attention_mask"]`` still marks the real tokens there,
    for the padding accounting.
    """
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": None,
            "use_cache": False,
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the item indices of each row, every row's lengths summing to at most ``width``.

    Items are placed longest first (ties in their order), each into the first row with room; a row keeps its items
    in placement order. Deterministic, so a resumed run packs its batches exactly as the first did.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > width:
            raise ValueError(f"an item of {length} tokens does not fit a packed row of {width}")
        for row, free in enumerate(room):
            if free >= length:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(width - length)
    return rows


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
        pack: pack the items into as few rows as fit the longest item's width (:func:`pack_rows`), with
            ``position_ids``; the batch's loss over its counted tokens is the unpacked batch's (see the module
            docstring). Rows never grow wider than the unpacked batch, so no attention costs more.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None, pack: bool = False) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; expected the tokenizer's pad (or end-of-text) token id")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack = bool(pack)

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Collate items with ``prompt_ids`` and ``response_ids`` lists into ``[B, T]`` tensors."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(it["prompt_ids"]) + len(it["response_ids"]) for it in items]
        width = _padded_length(lengths, self.pad_to_multiple_of)
        if self.pack:
            return self._packed(items, lengths, width)
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

    def _packed(self, items: Sequence[dict], lengths: list[int], width: int) -> dict[str, torch.Tensor]:
        rows = pack_rows(lengths, width)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for row, members in enumerate(rows):
            start = 0
            for index in members:
                item, length = items[index], lengths[index]
                n_prompt = len(item["prompt_ids"])
                end = start + length
                input_ids[row, start:end] = torch.tensor(
                    list(item["prompt_ids"]) + list(item["response_ids"]), dtype=torch.long
                )
                attention_mask[row, start:end] = 1
                loss_mask[row, start + max(n_prompt, 1) : end] = True  # never an item's first token
                position_ids[row, start:end] = torch.arange(length)
                start = end
            position_ids[row, start:] = torch.arange(width - start)  # the padding: one more segment of its own
        labels = input_ids.masked_fill(~loss_mask, IGNORE_INDEX)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "labels": labels,
            "position_ids": position_ids,
        }


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
