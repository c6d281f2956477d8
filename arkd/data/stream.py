"""The training batches as an endless, resumable stream (one epoch after the other; a peeked batch is not yet
delivered, so a checkpoint taken while one is peeked resumes exactly)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["BatchStream"]


class BatchStream:
    """Endless iteration over a resumable data loader: one epoch after the other, position saved with the run.

    Args:
        loader: an ``arkd.data.ResumableDataLoader`` (``arkd.data.build_dataloader``): seeded shuffling, sharded
            over processes, with ``state_dict`` / ``load_state_dict`` counting the samples delivered.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._iterator: Any = None
        self._peeked: tuple[dict[str, torch.Tensor], dict[str, int]] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def _fetch(self) -> dict[str, torch.Tensor]:
        for _ in range(2):  # the end of an epoch: start the next one
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise ValueError("the training data loader yields no batch: expected at least one full batch per process.")

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._peeked is not None:
            batch, self._peeked = self._peeked[0], None
            return batch
        return self._fetch()

    def peek(self) -> dict[str, torch.Tensor]:
        """The batch the next ``next()`` returns (the same object), without moving the saved position past it."""
        if self._peeked is None:
            position = dict(self.loader.state_dict())
            self._peeked = (self._fetch(), position)
        return self._peeked[0]

    def state_dict(self) -> dict[str, int]:
        """The data position (epoch, samples of this epoch delivered, seed, world size); a peeked batch is not
        delivered yet, so a resumed run draws it again."""
        if self._peeked is not None:
            return dict(self._peeked[1])
        return dict(self.loader.state_dict())

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
        self._peeked = None
        self.loader.load_state_dict(state)
