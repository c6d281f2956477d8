"""``ARKDGKDTrainer``: TRL's ``GKDTrainer`` with arkd's losses and alpha strategies (docs/integrations.md).

Switching a working GKD script is one import and two keyword arguments::

    from arkd.integrations.trl import ARKDGKDTrainer      # instead of trl.experimental.gkd.GKDTrainer
    trainer = ARKDGKDTrainer(model=..., teacher_model=..., args=GKDConfig(...), train_dataset=...,
                             processing_class=tokenizer, loss=BidirectionalKLLoss(), alpha=LearnedPolicy())

GKD's own machinery keeps working: ``lmbda`` (on-policy generation by the student), ``seq_kd`` (the teacher's
generations), the ChatML collator, the teacher's DeepSpeed preparation and ``num_items_in_batch`` normalisation.
``loss=GeneralizedJSDLoss(beta=args.beta)`` with no ``alpha`` is GKD's objective through arkd's fused path.
Needs TRL >= 1.16 (``pip install "arkd[trl]"``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from arkd.integrations._hf import STATE_FILE, ARKDTrainerMixin

try:
    from trl.experimental.gkd import GKDTrainer
except ImportError as error:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        'arkd.integrations.trl needs TRL >= 1.16 (trl.experimental.gkd): pip install "arkd[trl]".'
    ) from error

__all__ = ["ARKDGKDTrainer", "STATE_FILE"]

logger = logging.getLogger(__name__)


class ARKDGKDTrainer(ARKDTrainerMixin, GKDTrainer):
    """TRL's ``GKDTrainer`` whose loss is an arkd loss with an arkd alpha strategy.

    The arguments of ``GKDTrainer`` (``model``, ``teacher_model``, ``args`` a ``GKDConfig``, ``data_collator``,
    ``train_dataset``, ``processing_class``, ``callbacks``, ...) unchanged, plus:

    Args:
        loss: an arkd loss module (default ``BidirectionalKLLoss()``, ``alpha * FKL + (1 - alpha) * RKL``); used with
            ``reduction="sum"`` and normalised exactly as GKD normalises (by ``num_items_in_batch`` when the Trainer
            gives it, else by the micro-batch's counted tokens, ``labels != -100`` after the shift). Its own
            ``temperature`` applies (GKD's loss runs at temperature 1; ``GKDConfig.temperature`` is the sampling
            temperature of the on-policy generations, as in GKD). ``GKDConfig.beta`` is not read: pass
            ``GeneralizedJSDLoss(beta=...)`` for GKD's objective.
        alpha: a number, an arkd alpha strategy or an ``arkd.policy.AlphaControl`` (see ``KDTrainer``); default 0.5
            for a loss that takes alpha, none otherwise.
        reward: the learned policy's reward (default ``arkd.reward.PairedReward()`` for a strategy that learns).
        probe: an ``arkd.policy.AlphaSignalProbe`` (None: no probe).
        fused_linear: the KD term from the student's hidden states and output layer (None: when it fits, checked
            at the first step; False: the logits path; True: required).

    Raises:
        ValueError: one sentence for a combination that cannot work (previews under DeepSpeed / ZeRO-3, FSDP or
            several processes; an alpha with a loss that takes none).
    """

    def __init__(
        self,
        *args: Any,
        loss: torch.nn.Module | None = None,
        alpha: Any = None,
        reward: Any = None,
        probe: Any = None,
        fused_linear: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._arkd_init(loss=loss, alpha=alpha, reward=reward, probe=probe, kd_weight=1.0, ce_weight=0.0,
                        fused_linear=fused_linear)  # fmt: skip
        beta = getattr(self.kd_loss, "beta", None)
        if beta is None:
            logger.warning(
                "ARKDGKDTrainer trains %s, not GKD's generalized JSD: GKDConfig.beta=%s is not used (pass "
                "loss=arkd.losses.GeneralizedJSDLoss(beta=...) for GKD's objective).", type(self.kd_loss).__name__,
                self.beta,
            )  # fmt: skip
        elif beta != self.beta:
            logger.warning("ARKDGKDTrainer: the loss's beta=%s is used, not GKDConfig.beta=%s.", beta, self.beta)

    def _arkd_teacher(self) -> torch.nn.Module:
        return self.teacher_model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._arkd_on_policy and "on_policy" not in inputs:  # the student sampled these responses (lmbda)
            inputs["on_policy"] = torch.ones(inputs["input_ids"].shape[0], device=inputs["input_ids"].device)
        return self._arkd_compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def generate_on_policy_outputs(self, model, inputs, generation_config):
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self._arkd_on_policy = self.accelerator.unwrap_model(model) is not teacher  # seq_kd: the teacher's samples
        return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._arkd_on_policy = False
        return self._arkd_training_step(super().training_step, model, inputs, num_items_in_batch)
