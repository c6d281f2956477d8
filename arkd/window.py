"""The accumulation window: the ``grad_accum`` micro-batches of one optimiser step, on the device.

Each dataset batch goes through the rollout source (:mod:`arkd.rollout`), which may replace its responses by
generated ones. A batch that a preview already peeked at (the paired reward and the probe score the next training
batch) comes with the teacher logits computed then, so no batch is run through the teacher twice. The window also
keeps the rollout's books for the step's log row (the student-generated share, the generation time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from arkd.data.collate import shift_labels
from arkd.rollout import DatasetResponses

__all__ = ["Window"]

Drawn = tuple[dict[str, torch.Tensor], Any]  # a micro-batch on the device and its teacher logits (None: not yet)


class Window:
    """Draw accumulation windows from a batch stream through a rollout source.

    Args:
        batches: a :class:`arkd.data.stream.BatchStream` (``next``, ``peek``, ``state_dict``).
        rollout: an ``arkd.rollout.RolloutSource`` already bound to the models (None: the dataset's responses).
        teacher_logits: ``batch -> teacher logits`` (the objective's), for a peeked batch.
        accelerator: the run's accelerator (its device, the collectives).
        grad_accum: micro-batches per optimiser step and process.
        max_steps: the run's length (the rollout's schedules read it).
    """

    def __init__(
        self,
        batches: Any,
        rollout: Any,
        teacher_logits: Callable[[dict[str, torch.Tensor]], Any],
        accelerator: Any,
        *,
        grad_accum: int,
        max_steps: int,
    ) -> None:
        self.batches = batches
        self.rollout = rollout if rollout is not None else DatasetResponses()
        self.teacher_logits = teacher_logits
        self.accelerator = accelerator
        self.grad_accum, self.max_steps = grad_accum, max_steps
        # The next training batch, its device copy and its teacher logits, once a preview has peeked at it.
        self._next: tuple[Any, dict[str, torch.Tensor], Any] | None = None
        self._clock = 0.0  # the rollout's generation clock when the step began
        self._counts = [0.0, 0.0]  # the window's student share summed over sequences, sequences
        self.generation_seconds = 0.0  # generation time of this run (the recipe's summary)

    def bind_rollout(self, *, student: torch.nn.Module, teacher: torch.nn.Module | None, tokenizer: Any) -> Any:
        """Give the rollout source the models it generates with (the student as trained, unwrapped); a source the
        recipe did not configure gets the tokenizer and seed 0."""
        acc, rollout = self.accelerator, self.rollout
        if rollout.tokenizer is None:
            rollout.configure(tokenizer=tokenizer, seed=0)
        rollout.bind(
            student=acc.unwrap_model(student), teacher=acc.unwrap_model(teacher) if teacher is not None else None,
            device=acc.device, rank=acc.process_index, world_size=acc.num_processes,
        )  # fmt: skip
        return rollout

    def reset(self) -> None:
        """Forget a peeked batch (the stream was put back to a position before it: it is drawn again)."""
        self._next = None

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def draw(self, step: int) -> list[Drawn]:
        """The window of optimiser step ``step + 1`` (``step`` steps taken)."""
        self._clock, self._counts = self.rollout.generation_seconds, [0.0, 0.0]
        window = []
        for _ in range(self.grad_accum):
            batch = next(self.batches)
            train_batch = self.rollout.draw(batch, step=step + 1, max_steps=self.max_steps)
            share = train_batch.get("on_policy")
            if share is not None:
                self._counts[0] += float(share.sum())
            self._counts[1] += float(train_batch["input_ids"].shape[0])
            if self._next is not None and self._next[0] is batch:  # peeked by the last step's reward or probe
                _, device_batch, teacher_logits = self._next
                window.append((device_batch, teacher_logits))
            else:
                window.append((self._to_device(train_batch), None))
            self._next = None
        return window

    def peek_next(self, step: int) -> tuple[dict[str, torch.Tensor], Any]:
        """The first batch of the next window (on the device) and its teacher logits, kept for that window."""
        if self._next is None:
            batch = self.batches.peek()
            train_batch = self.rollout.preview(batch, step=step + 2, max_steps=self.max_steps)
            device_batch = self._to_device(train_batch)
            self._next = (batch, device_batch, self.teacher_logits(device_batch))
        return self._next[1], self._next[2]

    def counts(self, window: list[Drawn]) -> tuple[int, float]:
        """The window's counted tokens over all micro-batches and processes, and the share of its positions that are
        padding (length-grouped batches keep it low)."""
        acc = self.accelerator
        local_tokens = sum(int(shift_labels(b)[1].sum()) for b, _ in window)
        padding = torch.tensor(
            [sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b, _ in window),
             sum(int(b["attention_mask"].numel()) for b, _ in window)],
            device=acc.device,
        )  # fmt: skip
        global_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum").item())
        padding = acc.reduce(padding, reduction="sum")
        return global_tokens, float(padding[0]) / max(float(padding[1]), 1.0)

    def rollout_row(self) -> dict[str, Any]:
        """``rollout_student_fraction`` (the student's share of the window's sequences, all processes) and
        ``rollout_seconds`` (this step's generation time, the slowest process), with the source's own statistics."""
        acc = self.accelerator
        counts = acc.reduce(torch.tensor(self._counts, device=acc.device, dtype=torch.float64), reduction="sum")
        spent = self.rollout.generation_seconds - self._clock  # this step's generation (and previews)
        seconds = torch.tensor(spent, device=acc.device, dtype=torch.float64)
        if acc.num_processes > 1:
            seconds = acc.reduce(seconds, reduction="max")
        self.generation_seconds += float(seconds)
        return {
            "rollout_student_fraction": float(counts[0]) / max(float(counts[1]), 1.0),
            "rollout_seconds": float(seconds),
            **self.rollout.last_log(),
        }
