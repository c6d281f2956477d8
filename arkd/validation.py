"""Validation during training: the validation loss (cross-entropy per response token; FKL / RKL with a teacher) and
Rouge-L of generations, RNG-neutral (the training streams continue afterwards exactly where they were, whatever the
validation drew), and the rule that picks ``best/``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from arkd import rng
from arkd.data.collate import drop_last_position, model_inputs, shift_for_next_token, shift_labels
from arkd.step import kl_sums

__all__ = ["Validator"]


class Validator:
    """Score the student on the validation data.

    Args:
        batches: batch dicts for the validation loss (sharded over processes here).
        examples: examples (with ``references``) for validation Rouge-L.
        predict_fn: ``(model, examples) -> list[str]``, one generation per example (every process calls it with
            every example and gets all the generations).
        score_fn: ``(predictions, references) -> float``: Rouge-L x 100.
        teacher_logits: ``batch -> teacher logits`` (None without a teacher): adds ``val_fkl`` / ``val_rkl``.
        temperature: of the FKL / RKL.
        best_metric, best_mode: the metric that picks ``best/`` and its direction (``max`` or ``min``).
    """

    def __init__(
        self,
        *,
        batches: list[dict[str, torch.Tensor]] | None,
        examples: Sequence[Any] | None,
        predict_fn: Callable[[torch.nn.Module, Sequence[Any]], list[str]] | None,
        score_fn: Callable[[list[str], list[list[str]]], float] | None,
        teacher_logits: Callable[[dict[str, torch.Tensor]], Any] | None,
        temperature: float,
        best_metric: str,
        best_mode: str,
    ) -> None:
        self.batches = batches or []
        self.examples = list(examples or [])
        self.predict_fn, self.score_fn = predict_fn, score_fn
        self.teacher_logits, self.temperature = teacher_logits, temperature
        self.best_metric, self.best_mode = best_metric, best_mode

    @property
    def enabled(self) -> bool:
        return bool(self.batches or self.examples)

    def __call__(self, student: torch.nn.Module, accelerator: Any) -> dict[str, float]:
        """The validation row, with every random state restored afterwards."""
        state = rng.capture()
        try:
            return self.validate(student, accelerator)
        finally:
            rng.restore(state)

    @torch.no_grad()
    def validate(self, student: torch.nn.Module, accelerator: Any) -> dict[str, float]:
        """Validation loss, FKL / RKL when there is a teacher, and Rouge-L (the student back in train mode after)."""
        acc = accelerator
        model = acc.unwrap_model(student)
        student.eval()
        sums = torch.zeros(4, device=acc.device)  # ce, fkl, rkl, tokens
        # Processes may hold different numbers of validation batches: plain forwards, no DDP collectives.
        for batch in self.batches[acc.process_index :: acc.num_processes]:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            t_logits = self.teacher_logits(batch) if self.teacher_logits is not None else None
            s, m = shift_for_next_token(model(**model_inputs(batch)).logits, batch["loss_mask"].bool())
            targets, _ = shift_labels(batch)
            sums[0] += F.cross_entropy(s[m].float(), targets[m], reduction="sum")
            if t_logits is not None:
                fkl, rkl = kl_sums(s, drop_last_position(t_logits), m, self.temperature)
                sums[1] += fkl
                sums[2] += rkl
            sums[3] += m.sum()
        sums = acc.reduce(sums, reduction="sum")
        tokens = max(sums[3].item(), 1.0)
        row: dict[str, float] = {"val_loss": sums[0].item() / tokens}
        if self.teacher_logits is not None:
            row.update(val_fkl=sums[1].item() / tokens, val_rkl=sums[2].item() / tokens)
        if self.examples and self.predict_fn is not None and self.score_fn is not None:
            # Every process calls predict_fn with every example; arkd's own shares the rows over the processes
            # (arkd.evaluation.sharding) and returns all of them, the same on every process.
            predictions = self.predict_fn(model, self.examples)
            if len(predictions) != len(self.examples):
                raise ValueError(
                    f"predict_fn returned {len(predictions)} predictions for {len(self.examples)} "
                    "validation examples; expected one per example."
                )
            references = [list(example.references) for example in self.examples]
            row["val_rougeL"] = float(self.score_fn(predictions, references))
        student.train()
        return row

    def improves(self, row: dict[str, float], best: float | None) -> bool:
        """Whether ``row``'s ``best_metric`` (finite) beats ``best`` in the declared direction."""
        score = row.get(self.best_metric)
        if score is None or not math.isfinite(score):
            return False
        return best is None or (score > best if self.best_mode == "max" else score < best)
