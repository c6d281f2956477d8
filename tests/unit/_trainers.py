"""One builder for the unit tests' Trainers: what differs between tests is passed, the rest is fixed here."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from arkd.losses import BidirectionalKLLoss
from arkd.trainer import BatchStream, Trainer, TrainerConfig

_TRAINER_KEYS = set(inspect.signature(Trainer).parameters)


def make_trainer(
    student: Any,
    teacher: Any,
    batches: Any,
    optimizer: Any,
    *,
    steps: int,
    output_dir: str | Path,
    grad_accum: int = 1,
    **keywords: Any,
) -> Trainer:
    """A Trainer on a CPU accelerator (gradient accumulation as ``grad_accum``, the scheduler stepped once per
    optimiser step), without a scheduler, logging every step, without a progress bar, in ``output_dir``; the loss is
    the bidirectional KL (sum) when a teacher is given.

    Args:
        student, teacher, optimizer: the models and the student's optimiser.
        batches: a loader (wrapped in a ``BatchStream``) or a stream.
        steps: ``trainer.max_steps``.
        output_dir: the run directory.
        grad_accum: micro-batches per optimiser step.
        keywords: the Trainer's own (``strategy``, ``loss``, ``tokenizer``, ``reward``, ``probe``,
            ``validation_batches``, ``reward_batches``, ...) and ``TrainerConfig`` fields (``max_grad_norm``, ...).
    """
    parts = {key: keywords.pop(key) for key in list(keywords) if key in _TRAINER_KEYS}
    parts.setdefault("loss", BidirectionalKLLoss(reduction="sum") if teacher is not None else None)
    parts.setdefault("strategy", None)
    parts.setdefault("tokenizer", None)
    keywords.setdefault("log_interval", 1)
    config = TrainerConfig(
        max_steps=steps, grad_accum=grad_accum, output_dir=str(output_dir), progress=False, **keywords
    )
    stream = batches if isinstance(batches, BatchStream) else BatchStream(batches)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False)
    return Trainer(
        student=student, teacher=teacher, batches=stream, optimizer=optimizer, scheduler=parts.pop("scheduler", None),
        accelerator=accelerator, config=config, **parts,
    )  # fmt: skip
