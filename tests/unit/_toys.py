"""Toy language models and data for planted tests of the learned alpha through the real trainer."""

from __future__ import annotations

from types import SimpleNamespace

import torch

V, CONTEXTS = 8, 16


class TableLM(torch.nn.Module):
    """Next-token logits looked up per input token: ``logits[b, t] = table[input_ids[b, t]]``."""

    def __init__(self, table: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=trainable)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


class ContextLoader:
    """Endless batches of ``[context, anything]`` rows; the token after the context is the one distilled."""

    def __init__(self, batch_size: int, seed: int) -> None:
        self.batch_size, self.seed, self.position = batch_size, seed, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.position)
            self.position += 1
            ids = torch.stack([torch.randint(0, CONTEXTS, (self.batch_size,), generator=g),
                               torch.zeros(self.batch_size, dtype=torch.long)], dim=1)  # fmt: skip
            mask = torch.tensor([[False, True]]).expand(self.batch_size, 2).clone()
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class BlockLoader:
    """Endless batches whose contexts come in blocks: batch ``i`` holds rows of context ``((i + offset) // block)
    % contexts`` only, so every block starts a context the student has not trained on (each one a fresh copy of
    the same distillation problem)."""

    def __init__(self, batch_size: int, block: int, contexts: int, offset: int = 0) -> None:
        self.batch_size, self.block, self.contexts, self.offset, self.position = batch_size, block, contexts, offset, 0

    def __iter__(self):
        while True:
            context = ((self.position + self.offset) // self.block) % self.contexts
            self.position += 1
            yield context_rows(torch.full((self.batch_size,), context, dtype=torch.long))

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def context_rows(contexts: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch of ``[context, 0]`` rows whose second token is the one distilled."""
    ids = torch.stack([contexts, torch.zeros_like(contexts)], dim=1)
    mask = torch.tensor([[False, True]]).expand(len(contexts), 2).clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": mask}
