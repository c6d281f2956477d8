"""``KDTrainer``: a ``transformers.Trainer`` that distils a student from a teacher with arkd's losses and alpha
strategies (docs/integrations.md).

    from arkd.integrations.transformers import KDTrainer
    trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...), train_dataset=...,
                        loss=BidirectionalKLLoss(), alpha=LearnedPolicy(), probe=AlphaSignalProbe())
    trainer.train()

Batches are Hugging Face causal-LM batches: ``input_ids``, ``attention_mask`` and ``labels`` (-100 = not counted);
the loss counts the tokens whose ``labels`` are not -100 after the next-token shift.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from arkd.integrations._hf import STATE_FILE, ARKDTrainerMixin

__all__ = ["KDTrainer", "STATE_FILE"]


class KDTrainer(ARKDTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose loss is ``kd_weight * KD(alpha) + ce_weight * CE`` against a frozen teacher.

    Args:
        model: the student (as ``Trainer``).
        teacher_model: the teacher (a ``torch.nn.Module`` with the student's vocabulary; padded output rows beyond
            the common vocabulary are dropped); put in eval mode, frozen and placed like the student.
        args: ``transformers.TrainingArguments``.
        loss: an arkd loss module (default ``BidirectionalKLLoss()``); it is used with ``reduction="sum"`` and the
            sum over the counted tokens is divided by ``num_items_in_batch`` (the counted tokens of the whole
            accumulation window, when the Trainer counts them) or by the micro-batch's counted tokens.
        alpha: the FKL weight of a loss that takes alpha: a number, an arkd alpha strategy (``ConstantAlpha``,
            ``LinearSchedule``, ``AKLHeuristic``, ``LearnedPolicy``, ...) or an ``arkd.policy.AlphaControl`` (its
            strategy, reward and probe; the model, optimiser, step count and clipping are the Trainer's). Default:
            0.5 (None with a loss that takes no alpha).
        reward: the learned policy's reward (default ``arkd.reward.PairedReward()`` for a strategy that learns).
        probe: an ``arkd.policy.AlphaSignalProbe`` (None: no probe).
        kd_weight: weight of the KD term.
        ce_weight: weight of the cross-entropy on the labels (0: none).
        fused_linear: compute the KD term from the student's final hidden states and output layer, never building
            its ``[tokens, V]`` logits (None: when the model and the loss allow it, checked at the first step;
            False: the logits path; True: required).
        **kwargs: the other arguments of ``transformers.Trainer``.

    Raises:
        ValueError: one sentence for a combination that cannot work (previews under DeepSpeed, FSDP or several
            processes; an alpha with a loss that takes none; no teacher).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        teacher_model: torch.nn.Module | None = None,
        args: Any = None,
        *,
        loss: torch.nn.Module | None = None,
        alpha: Any = None,
        reward: Any = None,
        probe: Any = None,
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        fused_linear: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(
                f"KDTrainer distils from a teacher: teacher_model must be a torch.nn.Module, got "
                f"{type(teacher_model).__name__}."
            )
        super().__init__(model=model, args=args, **kwargs)
        from arkd.objective import prepare_teacher

        self.teacher_model = prepare_teacher(self.accelerator, teacher_model)
        self._arkd_init(loss=loss, alpha=alpha, reward=reward, probe=probe, kd_weight=kd_weight,
                        ce_weight=ce_weight, fused_linear=fused_linear)  # fmt: skip

    def _arkd_teacher(self) -> torch.nn.Module:
        return self.teacher_model

    def _arkd_process_scale(self, num_items_in_batch):
        """``transformers.Trainer.compute_loss``'s factor: with ``average_tokens_across_devices`` the loss over all
        processes' tokens is multiplied back by the processes that average it (one process: 1)."""
        if not (
            getattr(self.args, "average_tokens_across_devices", False)
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            return 1.0
        tp = self.get_tp_size() if callable(getattr(self, "get_tp_size", None)) else 1
        return float(self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return self._arkd_compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self._arkd_training_step(super().training_step, model, inputs, num_items_in_batch)
