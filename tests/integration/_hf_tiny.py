"""Tiny GPT-2 models, a tiny tokenizer and rows for the Hugging Face / TRL integration tests (no download)."""

from __future__ import annotations

import copy
import functools

import torch

from arkd.data import TrainingCollator
from arkd.models import build_tiny_model, build_tiny_tokenizer


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_tiny_tokenizer(vocab_size=300, corpus_size=200, seed=0)


@functools.lru_cache(maxsize=1)
def _models():
    v = len(tokenizer())
    teacher = build_tiny_model(v, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=1)
    student = build_tiny_model(v, n_layer=1, n_embd=16, n_head=2, n_positions=64, seed=2)
    with torch.no_grad():  # a peaked teacher, far from the near-uniform student: FKL and RKL (and alpha) differ
        teacher.lm_head.weight.mul_(30.0)
    return teacher, student


def models():
    """Fresh copies of ``(teacher, student)`` (equal weights at every call)."""
    teacher, student = _models()
    return copy.deepcopy(teacher), copy.deepcopy(student)


def rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` items ``{"prompt_ids", "response_ids"}`` of random ids and uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    v = len(tokenizer())
    out = []
    for _ in range(n):
        p, r = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
        out.append({"prompt_ids": torch.randint(1, v, (p,), generator=g).tolist(),
                    "response_ids": torch.randint(1, v, (r,), generator=g).tolist()})  # fmt: skip
    return out


class GKDCollator:
    """arkd's training batch (``input_ids``, ``attention_mask``, ``labels``, ``loss_mask``) plus GKD's left-padded
    ``prompts`` / ``prompt_attention_mask`` (what its on-policy generation reads)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.train = TrainingCollator(pad_token_id)
        self.pad = pad_token_id

    def __call__(self, items):
        batch = self.train(items)
        width = max(len(it["prompt_ids"]) for it in items)
        prompts = torch.full((len(items), width), self.pad, dtype=torch.long)
        prompt_mask = torch.zeros_like(prompts)
        for row, it in enumerate(items):
            k = len(it["prompt_ids"])
            prompts[row, width - k :] = torch.tensor(it["prompt_ids"])
            prompt_mask[row, width - k :] = 1
        batch.update(prompts=prompts, prompt_attention_mask=prompt_mask)
        return batch


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tol)
