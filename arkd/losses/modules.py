"""Thin ``nn.Module`` wrappers of :mod:`arkd.losses.functional`.

Each wrapper validates and stores its hyper-parameters (a clear ``ValueError`` on bad ones), ``temperature`` and
``reduction``, and calls its function: ``loss(student_logits, teacher_logits, mask=None)``. Every wrapper declares
what a trainer needs to know in three class attributes, the :class:`KDLoss` protocol, so that a trainer drives every
loss without branching on names or probing for methods:

* ``takes_alpha``: True only for :class:`BidirectionalKLLoss`, whose ``forward`` accepts ``alpha=`` per call
  (overriding the stored one), so an alpha strategy can feed it every step.
* ``needs_target_ids``: True only for :class:`DiversityAwareRKLLoss`, whose ``forward`` needs ``target_ids=``.
* ``has_schedule``: True only for :class:`TAIDLoss`, whose ``update(kd_mean)`` advances its own schedule once per
  optimizer step (its state is in ``state_dict``).

A loss of your own declares the same three attributes (subclass :class:`DivergenceLoss`, or set them on any
``nn.Module``); :func:`loss_capabilities` reads them and names what is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from . import functional, topk
from ._base import check_reduction, check_temperature, check_unit_interval
from .fused import fused_linear_bidirectional_kl
from .fused_jsd import fused_generalized_jsd, fused_linear_generalized_jsd

__all__ = [
    "AdaptiveKLLoss",
    "AlphaBetaDivergenceLoss",
    "BidirectionalKLLoss",
    "DiversityAwareRKLLoss",
    "EntropyGatedKLLoss",
    "ForwardKLLoss",
    "FusedLinearBidirectionalKLLoss",
    "GeneralizedJSDLoss",
    "JSDivergenceLoss",
    "KDLoss",
    "LossCapabilities",
    "ReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "TAIDLoss",
    "TokenWiseKLLoss",
    "TotalVariationLoss",
    "loss_capabilities",
]


def _check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@runtime_checkable
class KDLoss(Protocol):
    """What a trainer may rely on in a KD loss: a call on logits and three declared capabilities.

    ``loss(student_logits, teacher_logits, mask, **extra)`` returns the loss (``reduction="sum"`` in arkd's trainer),
    where ``extra`` holds ``alpha=`` when ``takes_alpha`` and ``target_ids=`` when ``needs_target_ids``; a loss with
    ``has_schedule`` also has ``update(kd_mean)``, called once per optimizer step.
    """

    takes_alpha: bool
    needs_target_ids: bool
    has_schedule: bool

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = ..., **extra: Any
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class LossCapabilities:
    """The three declarations of a :class:`KDLoss`, read once."""

    takes_alpha: bool
    needs_target_ids: bool
    has_schedule: bool


def loss_capabilities(loss: Any) -> LossCapabilities:
    """Read the declared capabilities (the :class:`KDLoss` attributes) of a loss module or class.

    Raises:
        TypeError: the loss does not declare all three (one sentence naming the missing ones), or declares
            ``has_schedule`` without an ``update`` method.
    """
    names = ("takes_alpha", "needs_target_ids", "has_schedule")
    what = loss.__name__ if isinstance(loss, type) else type(loss).__name__
    missing = [name for name in names if not isinstance(getattr(loss, name, None), bool)]
    if missing:
        raise TypeError(
            f"{what} does not declare {', '.join(missing)}: expected the boolean class attributes of "
            "arkd.losses.KDLoss (subclass arkd.losses.DivergenceLoss, or set them on the module)."
        )
    caps = LossCapabilities(*(bool(getattr(loss, name)) for name in names))
    if caps.has_schedule and not callable(getattr(loss, "update", None)):
        raise TypeError(f"{what} declares has_schedule but has no update(kd_mean) method.")
    return caps


class DivergenceLoss(nn.Module):
    """Base of the wrappers: stores ``temperature`` and ``reduction`` and calls ``function`` with ``hyper()``.

    Declares the :class:`KDLoss` capabilities as class attributes (all False here; a subclass sets its own).
    """

    function: Callable[..., torch.Tensor]
    #: the same divergence against a :class:`arkd.losses.TopKTeacher` (top-k log-probabilities and a tail bucket,
    #: the teacher cache); None: the loss needs the teacher's full logits.
    topk_function: Callable[..., torch.Tensor] | None = None
    takes_alpha: bool = False
    needs_target_ids: bool = False
    has_schedule: bool = False

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        check_temperature(temperature)
        check_reduction(reduction)
        self.temperature = float(temperature)
        self.reduction = reduction

    def hyper(self) -> dict[str, object]:
        """The function's hyper-parameters as keyword arguments."""
        return {}

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[..., V]`` logits and a ``[...]`` mask → ``[...]`` (``reduction="none"``) or a scalar; the teacher may
        be a :class:`arkd.losses.TopKTeacher` where the loss has a ``topk_function``."""
        function = type(self).function
        if isinstance(teacher_logits, topk.TopKTeacher):
            function = _topk_function(self)
        return function(
            student_logits,
            teacher_logits,
            mask,
            temperature=self.temperature,
            reduction=self.reduction,
            **self.hyper(),
        )

    def extra_repr(self) -> str:
        items = {"temperature": self.temperature, "reduction": self.reduction, **self.hyper()}
        return ", ".join(f"{k}={v!r}" for k, v in items.items())


def accepts_topk_teacher(loss: Any) -> bool:
    """Whether ``loss`` can work from a top-k teacher (:class:`arkd.losses.TopKTeacher`): it has a
    ``topk_function`` (FKL, RKL, bidirectional KL, generalized JSD, JS)."""
    return getattr(loss, "topk_function", None) is not None


def _topk_function(loss: Any) -> Callable[..., torch.Tensor]:
    if not accepts_topk_teacher(loss):
        raise ValueError(
            f"{type(loss).__name__} needs the teacher's full logits and cannot work from a top-k teacher (a teacher "
            "cache); expected forward_kl, reverse_kl, bidirectional_kl, generalized_jsd or js_divergence."
        )
    return type(loss).topk_function


class ForwardKLLoss(DivergenceLoss):
    """``KL(p || q)``; see :func:`arkd.losses.forward_kl`."""

    function = staticmethod(functional.forward_kl)
    topk_function = staticmethod(topk.forward_kl_topk)


class ReverseKLLoss(DivergenceLoss):
    """``KL(q || p)``; see :func:`arkd.losses.reverse_kl`."""

    function = staticmethod(functional.reverse_kl)
    topk_function = staticmethod(topk.reverse_kl_topk)


class BidirectionalKLLoss(DivergenceLoss):
    """``alpha KL(p || q) + (1 - alpha) KL(q || p)`` through the fast path; see :func:`arkd.losses.bidirectional_kl`.

    Args:
        alpha: default FKL weight in [0, 1]; ``forward(..., alpha=...)`` overrides it per call (a float or a tensor
            ``[]``, ``[B]``, ``[B, 1]`` or ``[B, T]``).
        chunk_size: tokens per chunk of the fast path (None: the library's default for V and the device).
    """

    function = staticmethod(functional.bidirectional_kl)
    topk_function = staticmethod(topk.bidirectional_kl_topk)
    takes_alpha = True

    def __init__(
        self,
        alpha: float = 0.5,
        *,
        temperature: float = 1.0,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(temperature=temperature, reduction=reduction)
        check_unit_interval("alpha", alpha)
        self.alpha = float(alpha)
        self.chunk_size = None if chunk_size is None else _check_positive_int("chunk_size", chunk_size)

    def hyper(self) -> dict[str, object]:
        return {"alpha": self.alpha, "chunk_size": self.chunk_size}

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        alpha: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`DivergenceLoss.forward`; ``alpha`` (when given) replaces the stored weight for this call."""
        hyper = self.hyper()
        if alpha is not None:
            hyper["alpha"] = alpha
        if isinstance(teacher_logits, topk.TopKTeacher):
            hyper.pop("chunk_size")
            return topk.bidirectional_kl_topk(
                student_logits, teacher_logits, mask, temperature=self.temperature, reduction=self.reduction, **hyper
            )
        return functional.bidirectional_kl(
            student_logits, teacher_logits, mask, temperature=self.temperature, reduction=self.reduction, **hyper
        )

    def from_hidden(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        alpha: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same loss from the student's final hidden states and output layer
        (:func:`arkd.losses.fused_linear_bidirectional_kl`: no ``[tokens, V]`` student logits are built)."""
        return fused_linear_bidirectional_kl(
            student_hidden, student_weight, teacher_logits, mask, student_bias=bias,
            alpha=self.alpha if alpha is None else alpha, temperature=self.temperature, reduction=self.reduction,
            chunk_size=self.chunk_size,
        )  # fmt: skip


def accepts_hidden_states(loss: Any) -> bool:
    """Whether ``loss`` can be computed from the student's final hidden states and output layer (``from_hidden``:
    the bidirectional KL and the generalized JSD), as ``trainer.fused_linear=true`` needs."""
    return callable(getattr(loss, "from_hidden", None))


class GeneralizedJSDLoss(DivergenceLoss):
    """GKD's generalized JSD (TRL convention, ``beta`` in [0, 1]); see :func:`arkd.losses.generalized_jsd`.

    Computed through the fast chunked path (:func:`arkd.losses.fused_generalized_jsd`: analytic gradient, no
    ``[tokens, V]`` intermediates besides the gradient) unless ``fused=False`` (the autograd composition of
    :func:`arkd.losses.generalized_jsd`, the reference; same values to float rounding). :meth:`from_hidden` computes it
    from the student's final hidden states and output layer.

    Args:
        beta: 0 is FKL, 1 is RKL, the interior the mixture divergence.
        chunk_size: tokens per chunk of the fast path (None: the library's default for V and the device).
        fused: use the fast path.
    """

    function = staticmethod(functional.generalized_jsd)
    topk_function = staticmethod(topk.generalized_jsd_topk)

    def __init__(
        self,
        beta: float = 0.5,
        *,
        temperature: float = 1.0,
        reduction: str = "mean",
        chunk_size: int | None = None,
        fused: bool = True,
    ) -> None:
        super().__init__(temperature=temperature, reduction=reduction)
        check_unit_interval("beta", beta)
        self.beta = float(beta)
        self.chunk_size = None if chunk_size is None else _check_positive_int("chunk_size", chunk_size)
        self.fused = bool(fused)

    def hyper(self) -> dict[str, object]:
        return {"beta": self.beta}

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As :meth:`DivergenceLoss.forward`, through the fast path when ``fused``."""
        if not self.fused or isinstance(teacher_logits, topk.TopKTeacher):
            return super().forward(student_logits, teacher_logits, mask)
        return fused_generalized_jsd(
            student_logits, teacher_logits, mask, beta=self.beta, temperature=self.temperature,
            reduction=self.reduction, chunk_size=self.chunk_size,
        )  # fmt: skip

    def from_hidden(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        alpha: None = None,
    ) -> torch.Tensor:
        """The same loss from the student's final hidden states and output layer
        (:func:`arkd.losses.fused_linear_generalized_jsd`: no ``[tokens, V]`` student logits are built). ``alpha``
        is accepted for the trainers' uniform call and must be None (this loss takes no alpha)."""
        if alpha is not None:
            raise ValueError("GeneralizedJSDLoss takes no alpha (its mixture is fixed by beta); pass alpha=None.")
        return fused_linear_generalized_jsd(
            student_hidden, student_weight, teacher_logits, mask, student_bias=bias, beta=self.beta,
            temperature=self.temperature, reduction=self.reduction, chunk_size=self.chunk_size,
        )  # fmt: skip


class JSDivergenceLoss(DivergenceLoss):
    """Jensen-Shannon divergence; see :func:`arkd.losses.js_divergence`."""

    function = staticmethod(functional.js_divergence)
    topk_function = staticmethod(topk.js_divergence_topk)


class TotalVariationLoss(DivergenceLoss):
    """Total variation distance; see :func:`arkd.losses.total_variation`."""

    function = staticmethod(functional.total_variation)


class SkewForwardKLLoss(DivergenceLoss):
    """DistiLLM's skew FKL (``skew`` in [0, 1)); see :func:`arkd.losses.skew_forward_kl`."""

    function = staticmethod(functional.skew_forward_kl)

    def __init__(self, skew: float = 0.1, *, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(temperature=temperature, reduction=reduction)
        check_unit_interval("skew", skew, open_high=True)
        self.skew = float(skew)

    def hyper(self) -> dict[str, object]:
        return {"skew": self.skew}


class SkewReverseKLLoss(SkewForwardKLLoss):
    """DistiLLM's skew RKL (``skew`` in [0, 1)); see :func:`arkd.losses.skew_reverse_kl`."""

    function = staticmethod(functional.skew_reverse_kl)


class AdaptiveKLLoss(DivergenceLoss):
    """AKL (``mu`` in [0, 1], the head's teacher mass); see :func:`arkd.losses.adaptive_kl`."""

    function = staticmethod(functional.adaptive_kl)

    def __init__(self, mu: float = 0.5, *, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(temperature=temperature, reduction=reduction)
        check_unit_interval("mu", mu)
        self.mu = float(mu)

    def hyper(self) -> dict[str, object]:
        return {"mu": self.mu}


class TokenWiseKLLoss(DivergenceLoss):
    """ToDi; see :func:`arkd.losses.token_wise_kl`."""

    function = staticmethod(functional.token_wise_kl)


class AlphaBetaDivergenceLoss(DivergenceLoss):
    """ABKD's alpha-beta divergence (finite ``alpha``, ``beta``); see :func:`arkd.losses.alpha_beta_divergence`."""

    function = staticmethod(functional.alpha_beta_divergence)

    def __init__(
        self, alpha: float = 0.5, beta: float = 0.5, *, temperature: float = 1.0, reduction: str = "mean"
    ) -> None:
        super().__init__(temperature=temperature, reduction=reduction)
        self.alpha = _check_finite("alpha", alpha)
        self.beta = _check_finite("beta", beta)

    def hyper(self) -> dict[str, object]:
        return {"alpha": self.alpha, "beta": self.beta}


class EntropyGatedKLLoss(DivergenceLoss):
    """BDKD's entropy-gated FKL + RKL (``weight`` > 0); see :func:`arkd.losses.entropy_gated_kl`."""

    function = staticmethod(functional.entropy_gated_kl)

    def __init__(self, weight: float = 3.0, *, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(temperature=temperature, reduction=reduction)
        self.weight = _check_finite("weight", weight)
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight!r}")

    def hyper(self) -> dict[str, object]:
        return {"weight": self.weight}


class DiversityAwareRKLLoss(DivergenceLoss):
    """DRKL (``gamma`` >= 0, the non-target weight); see :func:`arkd.losses.diversity_aware_rkl`.

    ``forward(student_logits, teacher_logits, mask=None, *, target_ids)`` needs the target token at each position.
    """

    function = staticmethod(functional.diversity_aware_rkl)
    needs_target_ids = True

    def __init__(self, gamma: float = 0.5, *, temperature: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(temperature=temperature, reduction=reduction)
        self.gamma = _check_finite("gamma", gamma)
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")

    def hyper(self) -> dict[str, object]:
        return {"gamma": self.gamma}

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        target_ids: torch.Tensor,
    ) -> torch.Tensor:
        """As :meth:`DivergenceLoss.forward`, with ``target_ids [...]`` (long; negative ids are not counted)."""
        return functional.diversity_aware_rkl(
            student_logits,
            teacher_logits,
            mask,
            temperature=self.temperature,
            reduction=self.reduction,
            target_ids=target_ids,
            gamma=self.gamma,
        )


class TAIDLoss(DivergenceLoss):
    """TAID's ``KL(p_t || q)`` with its interpolation parameter ``t`` and its adaptive schedule.

    The schedule follows TAID's reference implementation (SakanaAI/TAID, its ``TAID.update_t``; Shing et al.
    2025, arXiv 2501.16937). :meth:`update` is called once per optimisation step with that step's loss
    ``J``; the ``k``-th call (``k = 1, 2, ...``) does:

    * ``k = 1``: store ``J_1`` only (``t`` stays ``t_start``, the momentum stays 0);
    * ``k > 1``: ``delta = (J_{k-1} - J_k) / (J_{k-1} + 1e-15)`` (relative improvement),
      ``m = momentum * m + (1 - momentum) * delta`` and
      ``t = min(t_end, max(t_linear(k - 1), t + step_size * sigmoid(m) * (1 - t)))``,

    where ``t_linear(g) = t_start + (t_end - t_start) * g / total_steps`` is the linear floor at the 0-based step
    ``g = k - 1`` (the reference's ``global_step``, the optimizer steps done before the step whose loss is ``J_k``).
    The new ``t`` weighs the next step's loss. With ``adaptive=False`` ``t = t_linear(k - 1)`` (also from ``k = 2``).
    One difference: the reference calls its update on every forward, so with gradient accumulation it advances once
    per micro-batch; here it advances once per optimizer step, and skipped (non-finite) steps do not advance it.
    ``t`` and the schedule's state are in ``state_dict``; ``has_schedule`` declares :meth:`update` to the trainer.

    Args:
        t_start: the initial ``t`` (0.4 in the paper).
        t_end: the final ``t`` (1.0).
        total_steps: the number of optimisation steps of the run (for the linear floor).
        momentum: the momentum coefficient of the relative improvement (0.99).
        step_size: the adaptive step size (5e-4).
        adaptive: use the momentum-adaptive step on top of the linear floor.
    """

    has_schedule = True

    function = staticmethod(functional.taid_kl)

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        total_steps: int = 1000,
        *,
        momentum: float = 0.99,
        step_size: float = 5e-4,
        adaptive: bool = True,
        temperature: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(temperature=temperature, reduction=reduction)
        check_unit_interval("t_start", t_start)
        check_unit_interval("t_end", t_end)
        if t_end < t_start:
            raise ValueError(f"t_end ({t_end!r}) must be >= t_start ({t_start!r})")
        check_unit_interval("momentum", momentum, open_high=True)
        self.step_size = _check_finite("step_size", step_size)
        if self.step_size < 0:
            raise ValueError(f"step_size must be >= 0, got {step_size!r}")
        self.t_start, self.t_end, self.momentum = float(t_start), float(t_end), float(momentum)
        self.total_steps = _check_positive_int("total_steps", total_steps)
        self.adaptive = bool(adaptive)
        self.register_buffer("t", torch.tensor(float(t_start), dtype=torch.float64))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("momentum_value", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("previous_loss", torch.tensor(float("nan"), dtype=torch.float64))

    def hyper(self) -> dict[str, object]:
        return {"t": float(self.t)}

    def linear_floor(self, step: int) -> float:
        """``t_start + (t_end - t_start) * step / total_steps``, capped at ``t_end``."""
        return min(self.t_end, self.t_start + (self.t_end - self.t_start) * step / self.total_steps)

    @torch.no_grad()
    def update(self, loss: float | torch.Tensor) -> float:
        """Advance the schedule after an optimisation step whose TAID loss was ``loss``; return the new ``t``."""
        value = float(loss)
        if not math.isfinite(value):
            raise ValueError(f"TAIDLoss.update needs a finite loss, got {value!r}")
        previous = float(self.previous_loss)
        calls = int(self.step) + 1
        self.step.fill_(calls)
        self.previous_loss.fill_(value)
        if math.isnan(previous):  # the first call only records the loss, as the reference does
            return float(self.t)
        delta = (previous - value) / (previous + 1e-15)
        m = self.momentum * float(self.momentum_value) + (1.0 - self.momentum) * delta
        t = float(self.t)
        candidate = self.linear_floor(calls - 1)
        if self.adaptive:
            candidate = max(candidate, t + self.step_size / (1.0 + math.exp(-m)) * (1.0 - t))
        self.t.fill_(min(self.t_end, candidate))
        self.momentum_value.fill_(m)
        return float(self.t)


class FusedLinearBidirectionalKLLoss(nn.Module):
    """Module form of :func:`arkd.losses.fused_linear_bidirectional_kl` (hidden states in, no full student logits).

    ``forward(student_hidden, student_weight, teacher_logits=None, mask=None, *, alpha=None, **teacher)`` where
    ``teacher`` is ``teacher_hidden``/``teacher_weight``/``teacher_bias``/``student_bias``; ``reduction`` is
    ``"sum"`` or ``"mean"``. Its inputs are hidden states and output weights, not logits, so it is not a
    :class:`KDLoss` for a logits trainer; its declarations say what it takes.
    """

    takes_alpha = True
    needs_target_ids = False
    has_schedule = False

    def __init__(
        self,
        alpha: float = 0.5,
        *,
        temperature: float = 1.0,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        check_unit_interval("alpha", alpha)
        check_temperature(temperature)
        check_reduction(reduction)
        if reduction == "none":
            raise ValueError('FusedLinearBidirectionalKLLoss supports reduction "sum" or "mean", not "none"')
        self.alpha, self.temperature, self.reduction = float(alpha), float(temperature), reduction
        self.chunk_size = None if chunk_size is None else _check_positive_int("chunk_size", chunk_size)

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        alpha: float | torch.Tensor | None = None,
        **tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        """See :func:`arkd.losses.fused_linear_bidirectional_kl`; ``alpha`` overrides the stored weight."""
        return fused_linear_bidirectional_kl(
            student_hidden,
            student_weight,
            teacher_logits,
            mask,
            alpha=self.alpha if alpha is None else alpha,
            temperature=self.temperature,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            **tensors,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, reduction={self.reduction!r}"
