"""What one micro-batch's forward produces (:class:`StepOutput`) and the window's sums of it (:class:`WindowSums`),
shared by the objective that builds them, the alpha control that reads them and the loop that logs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from arkd.losses.functional import bidirectional_kl
from arkd.losses.topk import TopKTeacher, bidirectional_kl_topk
from arkd.policy.features import Features

__all__ = ["StepOutput", "WindowSums", "kl_sums", "masked_alpha_values"]


@dataclass
class StepOutput:
    """One micro-batch's forward: the loss to backpropagate and its named statistics (sums over counted tokens).

    Attributes:
        loss: ``kd_weight * kd + ce_weight * ce`` (with autograd).
        student_logits: ``[B, T-1, V]`` shifted student logits (position t predicts token t + 1).
        teacher_logits: ``[B, T-1, V]`` shifted teacher logits (None without a teacher).
        mask: ``[B, T-1]`` bool, the counted tokens.
        targets: ``[B, T-1]`` the tokens predicted.
        kd, ce: the KD and cross-entropy sums (None when not computed).
        fkl, rkl: FKL and RKL sums for logging (None when not computed).
        tokens: counted tokens.
        alpha: the alpha the KD term used (None without a strategy).
        features: the strategy's teacher-student statistics (None without a strategy).
        batch: the micro-batch (on the device).
        rng: the random state just before the student forward (its dropout masks can be replayed).
        student_hidden: ``[B, T-1, H]`` the student's final hidden states (``trainer.fused_linear``; else None).
    """

    loss: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    mask: torch.Tensor
    targets: torch.Tensor
    kd: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    fkl: torch.Tensor | None = None
    rkl: torch.Tensor | None = None
    tokens: int = 0
    alpha: torch.Tensor | None = None
    features: Features | None = None
    batch: dict[str, torch.Tensor] | None = None
    rng: Any = None
    student_hidden: torch.Tensor | None = None

    def for_control(self) -> dict[str, Any]:
        """The fields :meth:`arkd.policy.control.StepControl.record` reads."""
        return {
            "alpha": self.alpha,
            "batch": self.batch,
            "teacher_logits": self.teacher_logits,
            "mask": self.mask,
            "student_logits": self.student_logits,
            "rng": self.rng,
            "features": self.features,
        }

    def detached(self, *, keep_student: bool, keep_teacher: bool) -> StepOutput:
        """A copy without autograd history, holding the student's / teacher's logits only where asked (a preview
        scores with the teacher's; the legacy reward compares the student's before and after)."""
        return StepOutput(
            loss=self.loss.detach(),
            student_logits=self.student_logits.detach() if keep_student and self.student_logits is not None else None,
            teacher_logits=self.teacher_logits if keep_teacher else None,
            mask=self.mask,
            targets=self.targets,
            kd=None if self.kd is None else self.kd.detach(),
            ce=None if self.ce is None else self.ce.detach(),
            fkl=self.fkl,
            rkl=self.rkl,
            tokens=self.tokens,
            alpha=None if self.alpha is None else self.alpha.detach(),
            features=self.features,
            batch=self.batch,
            rng=self.rng,
        )


class WindowSums:
    """The window's loss statistics, summed over micro-batches (then over processes)."""

    KEYS = ("loss", "kd", "ce", "fkl", "rkl")

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(len(self.KEYS), device=device, dtype=torch.float32)

    def add(self, out: StepOutput) -> None:
        for i, key in enumerate(self.KEYS):
            value = getattr(out, key)
            if value is not None:
                self.values[i] += value.detach().float().to(self.values.device)

    def reduced(self, accelerator: Any) -> dict[str, float]:
        values = accelerator.reduce(self.values, reduction="sum")
        return {key: float(values[i]) for i, key in enumerate(self.KEYS)}


def kl_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTeacher,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over counted tokens of FKL = KL(p||q) and RKL = KL(q||p), no grad (``arkd.losses.bidirectional_kl``'s
    components: the loss's own arithmetic, so a student at ``-inf`` where the teacher has mass gives ``inf`` here
    too); over the top-k tokens and the tail bucket for a :class:`arkd.losses.TopKTeacher`."""
    with torch.no_grad():
        if isinstance(teacher_logits, TopKTeacher):
            _, fkl, rkl = bidirectional_kl_topk(
                student_logits.detach(), teacher_logits, mask, temperature=temperature, reduction="sum",
                return_components=True,
            )  # fmt: skip
            return fkl.float(), rkl.float()
        _, fkl, rkl = bidirectional_kl(
            student_logits.detach(),
            teacher_logits.detach(),
            mask,
            temperature=temperature,
            reduction="sum",
            return_components=True,
        )
    return fkl.float(), rkl.float()


def masked_alpha_values(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The alpha values that weighed counted tokens, flat (for the logged mean / std)."""
    alpha = alpha.detach().float()
    if alpha.dim() == 0:
        return alpha.reshape(1)
    if alpha.dim() == 1:
        return alpha[mask.any(dim=-1)] if alpha.shape[0] == mask.shape[0] else alpha
    return alpha[mask] if alpha.shape == mask.shape else alpha.reshape(-1)
