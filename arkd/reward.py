"""Immediate rewards of the learned alpha policy: the alignment measure and the two credit schemes.

The alignment is ``D = (FKL + RKL) / 2`` per counted token (:func:`token_alignment`, i.e.
``arkd.losses.bidirectional_kl`` at alpha 0.5 without autograd); a reward is a *decrease* of D caused by a step.
Two rewards, chosen with the ``reward`` config group (docs/policy.md has the equations and the measurements):

- :class:`PairedReward` (``reward=paired``, the default): at a reward step the policy samples K >= 2 actions at one
  state; each is previewed as the trainer's real step from the same optimiser state
  (``arkd.policy.lookahead.StepPreview``) and scored on a batch the step did not use (the next training batch,
  ``held_out: next``) or on the step's own window (``held_out: same``). The reward of candidate k is
  ``r_k = D(theta) - D(theta'_k)``; the policy learns from ``r_k - mean_{j != k} r_j``, in which batch difficulty,
  the learning-rate level and the shared optimiser momentum cancel.
- :class:`SameBatchReward` (``reward=same_batch``, kept for comparison): the applied action's improvement on its own
  batch, ``D_before - D_after``, at the policy's granularity (per sequence or token: each entry its own reward). Both
  forwards share one dropout mask (the after-forward replays the training forward's random state), so a step that
  changes nothing earns exactly 0.

Every function is computed without autograd and returns detached values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from arkd import distributed as pdist
from arkd import rng
from arkd.data.collate import drop_last_position, model_inputs
from arkd.losses.functional import bidirectional_kl
from arkd.losses.topk import TopKTeacher, bidirectional_kl_topk

GRANULARITIES = ("batch", "sequence", "token")
HELD_OUT = ("next", "same")


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None, where: str) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{where}: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [B, T, V]"
        )
    if student_logits.dim() != 3:
        raise ValueError(f"{where}: logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} must be [B, T] = {tuple(student_logits.shape[:2])}")


def reduce_tokens(values: torch.Tensor, mask: torch.Tensor | None = None, granularity: str = "batch") -> torch.Tensor:
    """Reduce per-token values ``[B, T]`` over the counted tokens.

    Args:
        values: ``[B, T]`` per-token values.
        mask: ``[B, T]`` bool, True = counted; None counts everything.
        granularity: ``"batch"`` -> ``[]`` mean over all counted tokens; ``"sequence"`` -> ``[B]`` mean per row;
            ``"token"`` -> ``[B, T]``. Uncounted positions are 0; a reduction with no counted token is 0.

    Returns:
        ``[]``, ``[B]`` or ``[B, T]``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    mask = mask.to(device=values.device, dtype=torch.bool)
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if granularity == "token":
        return values
    if granularity == "sequence":
        return values.sum(-1) / mask.sum(-1).clamp_min(1).to(values.dtype)
    return values.sum() / mask.sum().clamp_min(1).to(values.dtype)


@torch.no_grad()
def token_alignment(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token ``(KL(p || q) + KL(q || p)) / 2`` of ``[..., V]`` logits: ``[...]`` (0 where not counted).

    This is ``arkd.losses.bidirectional_kl`` at ``alpha = 0.5`` (its chunked path: fp32, -inf safe, a few
    ``[chunk, V]`` buffers), evaluated without autograd.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher_logits, TopKTeacher):  # the teacher cache: over the top-k tokens and the tail bucket
        return bidirectional_kl_topk(
            student_logits.detach(), teacher_logits, mask, temperature=temperature, alpha=0.5, reduction="none"
        ).float()
    return bidirectional_kl(
        student_logits.detach(), teacher_logits.detach(), mask, temperature=temperature, alpha=0.5, reduction="none"
    ).float()


def alignment(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    granularity: str = "batch",
) -> torch.Tensor:
    """D = (FKL + RKL) / 2 over the counted tokens (lower is better aligned).

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``.
        mask: ``[B, T]`` bool, True = counted.
        temperature: softmax temperature of both distributions.
        granularity: ``"batch"`` (``[]``), ``"sequence"`` (``[B]``) or ``"token"`` (``[B, T]``).
    """
    _check(student_logits, teacher_logits, mask, "alignment")
    values = token_alignment(student_logits, teacher_logits, mask, temperature=temperature)
    return reduce_tokens(values, mask, granularity)


def improvement(d_before: torch.Tensor | float, d_after: torch.Tensor | float) -> torch.Tensor:
    """``d_before - d_after``: positive when alignment improved (any matching shapes)."""
    return torch.as_tensor(d_before) - torch.as_tensor(d_after)


@dataclass
class PairedReward:
    """The paired counterfactual reward (``reward=paired``): K candidate actions, one state, one held-out batch.

    Args:
        interval: a reward step every this many optimiser steps.
        candidates: K >= 2 actions sampled from the policy per reward step (each costs one student forward on the
            held-out batch; at sequence / token granularity also one backward).
        held_out: ``"next"`` (the next training batch, which the step did not use; its teacher logits are kept for
            the next step, so no extra teacher forward) or ``"same"`` (the step's own window, for comparison).
        equal_norm: compare candidates at the norm of the applied step's gradient (removes "the longer gradient
            wins": RKL's gradient is 1.4-2.1x longer than FKL's on ``tiny``).
    """

    interval: int = 8
    candidates: int = 2
    held_out: str = "next"
    equal_norm: bool = False

    name = "paired"
    branches = False  # measured at the step it credits (not over a horizon of real steps)
    needs_student_logits = False  # it scores previews of the step (works with trainer.fused_linear)

    def __post_init__(self) -> None:
        if int(self.interval) < 1:
            raise ValueError(f"reward.interval must be >= 1, got {self.interval}")
        if int(self.candidates) < 2:
            raise ValueError(f"reward.candidates must be >= 2 (a paired reward compares), got {self.candidates}")
        if self.held_out not in HELD_OUT:
            raise ValueError(f"reward.held_out must be one of {HELD_OUT}, got {self.held_out!r}")
        self.interval, self.candidates = int(self.interval), int(self.candidates)

    def due(self, step: int) -> bool:
        """True when optimiser step ``step`` (1-based) is a reward step."""
        return step % self.interval == 0

    @staticmethod
    def rewards(base: float, scores: list[float]) -> torch.Tensor:
        """``r_k = D(theta) - D(theta'_k)`` from the held-out D now and after each candidate's step."""
        return torch.tensor([base - s for s in scores], dtype=torch.float64)

    def measure(
        self,
        preview: Any,
        held_out: Callable[..., float],
        same: Callable[..., float],
        candidates: list[list[torch.Tensor]],
        offsets: list[dict[str, torch.Tensor]],
    ) -> torch.Tensor:
        """The K candidates' rewards at one state: each candidate's previewed step scored on the held-out data (or
        the step's own window, ``held_out: same``).

        Args:
            preview: the step's ``arkd.policy.lookahead.StepPreview`` (its gradient, dg/dalpha, the optimiser's update).
            held_out, same: D of the next training batch / of the step's own window at given parameters.
            candidates: the candidate actions of the step's decisions (one list per decision).
            offsets: for per-sequence / per-token candidates, each candidate's exact gradient difference (empty for
                one alpha per step, where a candidate is a shift along dg/dalpha).
        """
        scorer = held_out if self.held_out == "next" else same
        base = scorer()
        if offsets:
            scores = [scorer(preview.params_at(offset=offset, equal_norm=self.equal_norm)) for offset in offsets]
        else:
            shifts = [float(c) - preview.alpha_mean for c in candidates[0]]
            scores = [scorer(preview.params_at(shift, equal_norm=self.equal_norm)) for shift in shifts]
        return self.rewards(base, scores)


@dataclass
class SameBatchReward:
    """The legacy same-batch self-improvement (``reward=same_batch``): ``D_before - D_after`` on the step's batch.

    Args:
        interval: a reward step every this many optimiser steps.
    """

    interval: int = 4

    name = "same_batch"
    branches = False
    needs_student_logits = True  # it compares the student's logits before and after the step
    candidates = 1
    held_out = "same"
    equal_norm = False

    def __post_init__(self) -> None:
        if int(self.interval) < 1:
            raise ValueError(f"reward.interval must be >= 1, got {self.interval}")
        self.interval = int(self.interval)

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def measure(
        self,
        model: torch.nn.Module,
        kept: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, Any]],
        *,
        temperature: float,
        granularity: str,
    ) -> tuple[float, list[torch.Tensor]]:
        """``D_before - D_after`` of each micro-batch after the step, under one dropout mask.

        Args:
            model: the student after the step (unwrapped: a plain forward on this process's batches).
            kept: per micro-batch ``(batch, student logits before [B, T-1, V], teacher logits [B, T-1, V], mask
                [B, T-1], random state before the training forward)``; the forward after replays that state.
            temperature: of D.
            granularity: of the per-batch rewards (``[]``, ``[B]`` or ``[B, T]`` each).

        Returns:
            The mean improvement per counted token over all micro-batches and processes, and each micro-batch's
            improvement at ``granularity``.
        """
        device = next(model.parameters()).device
        per_batch, sums = [], torch.zeros(2, dtype=torch.float64)
        for batch, s_before, teacher_logits, mask, state in kept:
            with torch.no_grad(), rng.replaying(state, device):
                s_after = model(**model_inputs(batch)).logits
            d_before = token_alignment(s_before, teacher_logits, mask, temperature=temperature)
            d_after = token_alignment(drop_last_position(s_after), teacher_logits, mask, temperature=temperature)
            gain = torch.where(mask, d_before - d_after, 0.0)
            per_batch.append(reduce_tokens(gain, mask, granularity))
            sums += torch.stack([gain.sum().double().cpu(), mask.sum().double().cpu()])
        sums = pdist.all_reduce_sum(sums)
        return float(sums[0] / sums[1].clamp_min(1)), per_batch


CONTINUE_FROM = ("best", "mean")


@dataclass
class HorizonReward:
    """The paired reward over a horizon of real training steps (``reward=horizon``).

    Training runs in segments of ``horizon`` optimiser steps. At the start of a decided segment the policy samples
    ``candidates`` alphas at that state; from one in-memory snapshot of everything a run needs (weights, optimiser
    moments, scheduler, data position, random state), each candidate trains for ``horizon`` real steps on the same
    batches with its alpha held, and is scored by ``D = (FKL + RKL) / 2`` per token on the reward split (rows carved
    out of the training data, which no step trains on). The reward of candidate k is ``D(start) - D(end of branch
    k)``; the policy learns from the leave-one-out advantages at the segment's start state. The main line continues
    from the best branch (``continue_from: best``, the default: the run takes the better of the trajectories it has
    already paid for, at ``candidates`` x the steps of a plain run) or from a branch at the policy's mean alpha
    (``mean``: one more branch, ``candidates + 1`` x).

    Args:
        horizon: optimiser steps per segment (the reward's horizon).
        candidates: K >= 2 alphas per decided segment.
        interval: decide every this many segments (the others train at the policy's mean without branching).
        continue_from: ``best`` or ``mean``.
        rows: rows of the training data held out as the reward split.
    """

    horizon: int = 32
    candidates: int = 2
    interval: int = 1
    continue_from: str = "best"
    rows: int = 64

    name = "horizon"
    branches = True  # the loop runs real branches of ``horizon`` steps
    needs_student_logits = False
    held_out = "reward"
    equal_norm = False

    def __post_init__(self) -> None:
        for key, low in (("horizon", 1), ("candidates", 2), ("interval", 1), ("rows", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or int(value) != value or int(value) < low:
                raise ValueError(f"reward.{key} must be an integer >= {low}, got {value!r}")
            setattr(self, key, int(value))
        if self.continue_from not in CONTINUE_FROM:
            raise ValueError(f"reward.continue_from must be one of {CONTINUE_FROM}, got {self.continue_from!r}")

    def due(self, step: int) -> bool:
        """True when a segment starts after ``step`` steps and is decided (branched)."""
        return step % self.horizon == 0 and (step // self.horizon) % self.interval == 0

    @staticmethod
    def rewards(base: float, scores: list[float]) -> torch.Tensor:
        """``r_k = D(start) - D(end of branch k)`` on the reward split."""
        return torch.tensor([base - s for s in scores], dtype=torch.float64)
