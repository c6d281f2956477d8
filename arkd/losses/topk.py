r"""Divergences against a teacher known only by its top-k log-probabilities and the mass of the rest (a "tail bucket").

A teacher cache (``arkd.teacher_cache``, ``scripts/cache_teacher.py``) keeps, per response token, the teacher's k most
likely tokens ``S`` with their log-probabilities ``log p_v`` and the log of the remaining mass
``log p_R = log(1 - sum_{v in S} p_v)``. The student is known in full (its logits are computed in the step). Both are
coarsened to the same k + 1 categories, the k tokens of ``S`` and one bucket ``R`` for every other token:

    P = (p_{v_1}, ..., p_{v_k}, p_R),   Q = (q_{v_1}, ..., q_{v_k}, q_R),   q_R = sum_{v not in S} q_v,

and a divergence is evaluated between ``P`` and ``Q``. For FKL and RKL the chain rule of the KL divergence gives the
error exactly (docs/losses.md):

    KL(p || q) = KL(P || Q) + p_R KL(p_{.|R} || q_{.|R}),   KL(q || p) = KL(Q || P) + q_R KL(q_{.|R} || p_{.|R}),

so the top-k value is a lower bound that misses only the mismatch *inside* the tail, weighted by the tail's mass; it is
exact when the tail is empty (k = V). Every f-divergence (the generalized JSD too) can only shrink under the
coarsening (data processing). Gradients reach the student's logits of every token: through ``q_v`` for the k tokens and
through ``q_R`` for all the others together.

Functions take ``(student_logits [..., V], teacher: TopKTeacher [...], mask [...] | None, *, temperature, reduction)``
like those of :mod:`arkd.losses.functional`; the teacher's temperature must be the loss's (the cache stores
``log softmax(z / T)`` at one T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import (
    broadcast_token_weight,
    check_alpha,
    check_reduction,
    check_temperature,
    check_unit_interval,
    compute_dtype,
    masked_reduce,
)

__all__ = [
    "TopKTeacher",
    "bidirectional_kl_topk",
    "coarse_log_probs",
    "forward_kl_topk",
    "generalized_jsd_topk",
    "js_divergence_topk",
    "reverse_kl_topk",
]

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher's next-token distributions kept as top-k log-probabilities and one tail bucket, per position.

    Attributes:
        indices: ``[..., k]`` long, the k most likely token ids, most likely first.
        logprobs: ``[..., k]`` float, ``log p_v`` of those tokens at ``temperature``.
        log_tail: ``[...]`` float, ``log`` of the mass of every other token (``-inf`` when nothing is left, as at
            k = V).
        vocab_size: V, the vocabulary the distributions are over (the student's logits must be V wide).
        temperature: the temperature of ``p = softmax(teacher_logits / temperature)``.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    log_tail: torch.Tensor
    vocab_size: int
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.indices.shape != self.logprobs.shape or self.indices.shape[:-1] != self.log_tail.shape:
            raise ValueError(
                f"TopKTeacher: indices {tuple(self.indices.shape)}, logprobs {tuple(self.logprobs.shape)} and log_tail "
                f"{tuple(self.log_tail.shape)} must be [..., k], [..., k] and [...]"
            )

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """The token shape ``[...]``."""
        return self.log_tail.shape

    @property
    def device(self) -> torch.device:
        return self.logprobs.device

    def __getitem__(self, index) -> TopKTeacher:
        """Index the token dimensions (e.g. ``teacher[:, :-1]``, ``teacher[mask]``); the k dimension is kept."""
        return TopKTeacher(
            self.indices[index], self.logprobs[index], self.log_tail[index], self.vocab_size, self.temperature
        )

    def to(self, device) -> TopKTeacher:
        return TopKTeacher(
            self.indices.to(device),
            self.logprobs.to(device),
            self.log_tail.to(device),
            self.vocab_size,
            self.temperature,
        )

    def detach(self) -> TopKTeacher:
        return self

    def reshape(self, *shape: int) -> TopKTeacher:
        """Reshape the token dimensions."""
        return TopKTeacher(
            self.indices.reshape(*shape, self.k),
            self.logprobs.reshape(*shape, self.k),
            self.log_tail.reshape(*shape),
            self.vocab_size,
            self.temperature,
        )

    @classmethod
    @torch.no_grad()
    def from_logits(cls, teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0) -> TopKTeacher:
        """The exact top-k view of full teacher logits ``[..., V]``: ``log_tail`` is the log-sum-exp of the tokens
        outside the top k (no ``1 - sum`` cancellation), ``-inf`` when k = V."""
        check_temperature(temperature)
        v = teacher_logits.shape[-1]
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= v:
            raise ValueError(f"k must be an integer in [1, {v}] (the vocabulary size), got {k!r}")
        dtype = compute_dtype(teacher_logits.dtype)
        log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        top, index = log_p.topk(k, dim=-1)
        rest = log_p.scatter(-1, index, _NEG_INF)
        return cls(index, top, rest.logsumexp(dim=-1), int(v), float(temperature))


def _check(student_logits: torch.Tensor, teacher: TopKTeacher, mask, temperature: float, reduction: str):
    check_reduction(reduction)
    check_temperature(temperature)
    if not isinstance(teacher, TopKTeacher):
        raise ValueError(f"teacher must be a TopKTeacher, got {type(teacher).__name__}")
    if not torch.is_floating_point(student_logits):
        raise ValueError(f"student_logits must be a floating point tensor, got {student_logits.dtype}")
    v = student_logits.shape[-1]
    if v != teacher.vocab_size:
        raise ValueError(
            f"student_logits has vocabulary size {v} but the top-k teacher is over a vocabulary of "
            f"{teacher.vocab_size}; expected the same vocabulary (the cache's tokenizer)"
        )
    if student_logits.shape[:-1] != teacher.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and the top-k teacher's token shape {tuple(teacher.shape)} "
            "must agree as [..., V] and [...]"
        )
    if abs(float(teacher.temperature) - float(temperature)) > 1e-12:
        raise ValueError(
            f"the top-k teacher holds log-probabilities at temperature {teacher.temperature}, the loss asks for "
            f"{temperature}; expected one temperature (write the cache at the loss's temperature)"
        )
    if mask is None:
        return None
    if mask.shape != teacher.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the token shape is {tuple(teacher.shape)}")
    return mask.to(device=student_logits.device, dtype=torch.bool)


def _safe_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dimension that is ``-inf`` (with a zero, not NaN, gradient) on all-``-inf`` rows."""
    top = x.amax(dim=-1, keepdim=True)
    empty = top == _NEG_INF
    top = torch.where(empty, torch.zeros_like(top), top).detach()
    total = (x - top).exp().sum(dim=-1)
    positive = total > 0
    log_total = torch.log(torch.where(positive, total, torch.ones_like(total)))
    return torch.where(positive, top.squeeze(-1) + log_total, torch.full_like(log_total, _NEG_INF))


def coarse_log_probs(
    student_logits: torch.Tensor, teacher: TopKTeacher, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two coarsened distributions over the teacher's k tokens and the tail bucket, as log-probabilities.

    Returns:
        ``(log_Q, log_P)``, both ``[..., k + 1]`` in the compute dtype: ``log_Q`` the student's (with autograd; the
        last entry ``log q_R`` is the log-sum-exp of the student's log-probabilities outside the k tokens) and
        ``log_P`` the teacher's (constant).
    """
    dtype = torch.promote_types(compute_dtype(student_logits.dtype), compute_dtype(teacher.logprobs.dtype))
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    index = teacher.indices.to(device=log_q.device, dtype=torch.long)
    log_q_top = log_q.gather(-1, index)
    log_q_tail = _safe_logsumexp(log_q.scatter(-1, index, _NEG_INF))
    log_Q = torch.cat([log_q_top, log_q_tail.unsqueeze(-1)], dim=-1)
    log_p_top = teacher.logprobs.to(device=log_q.device, dtype=dtype)
    log_P = torch.cat([log_p_top, teacher.log_tail.to(device=log_q.device, dtype=dtype).unsqueeze(-1)], dim=-1)
    return log_Q, log_P.detach()


def _counted(student_logits: torch.Tensor, teacher: TopKTeacher, mask: torch.Tensor | None, temperature: float):
    """``(log_Q, log_P, scatter)`` of the counted tokens only (``[N, k + 1]``), and ``scatter(values [N]) -> [...]``
    putting per-token values back in the token shape (0 elsewhere): uncounted positions (prompt, padding, a cache's
    filler) are never computed, so nothing there can reach a value or a gradient."""
    if mask is None:
        log_Q, log_P = coarse_log_probs(student_logits, teacher, temperature=temperature)
        return log_Q, log_P, lambda values: values
    log_Q, log_P = coarse_log_probs(student_logits[mask], teacher[mask], temperature=temperature)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(mask.shape)
        return full.index_put((mask,), values) if values.numel() else full + values.sum()

    return log_Q, log_P, scatter


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    from .functional import _kl as kl

    return kl(log_a, log_b)


def forward_kl_topk(student_logits, teacher: TopKTeacher, mask=None, *, temperature=1.0, reduction="mean"):
    r"""``KL(P || Q)`` over the teacher's top-k tokens and the tail bucket (the module docstring); = FKL at k = V."""
    mask = _check(student_logits, teacher, mask, temperature, reduction)
    log_Q, log_P, scatter = _counted(student_logits, teacher, mask, temperature)
    return masked_reduce(scatter(_kl(log_P, log_Q)), mask, reduction)


def reverse_kl_topk(student_logits, teacher: TopKTeacher, mask=None, *, temperature=1.0, reduction="mean"):
    r"""``KL(Q || P)`` over the teacher's top-k tokens and the tail bucket; = RKL at k = V."""
    mask = _check(student_logits, teacher, mask, temperature, reduction)
    log_Q, log_P, scatter = _counted(student_logits, teacher, mask, temperature)
    return masked_reduce(scatter(_kl(log_Q, log_P)), mask, reduction)


def bidirectional_kl_topk(
    student_logits,
    teacher: TopKTeacher,
    mask=None,
    *,
    temperature=1.0,
    reduction="mean",
    alpha: float | torch.Tensor = 0.5,
    return_components: bool = False,
):
    r"""``alpha KL(P || Q) + (1 - alpha) KL(Q || P)`` (alpha a float or a tensor ``[]``, ``[B]``, ``[B, 1]``,
    ``[B, T]``, constant); with ``return_components`` also the FKL and RKL parts."""
    mask = _check(student_logits, teacher, mask, temperature, reduction)
    check_alpha(alpha)
    log_Q, log_P, scatter = _counted(student_logits, teacher, mask, temperature)
    fkl, rkl = _kl(log_P, log_Q), _kl(log_Q, log_P)
    a = broadcast_token_weight("alpha", alpha, teacher.shape, fkl.device)
    a = (a if mask is None else a[mask]).to(fkl.dtype)
    # alpha in {0, 1} must not turn an infinite side into NaN (0 * inf)
    loss = torch.where(a == 0, 0.0, a * fkl) + torch.where(a == 1, 0.0, (1 - a) * rkl)
    loss = masked_reduce(scatter(loss), mask, reduction)
    if not return_components:
        return loss
    return (
        loss,
        masked_reduce(scatter(fkl.detach()), mask, reduction),
        masked_reduce(scatter(rkl.detach()), mask, reduction),
    )


def generalized_jsd_topk(
    student_logits, teacher: TopKTeacher, mask=None, *, temperature=1.0, reduction="mean", beta: float = 0.5
):
    r"""GKD's generalized JSD (TRL convention) between ``P`` and ``Q``: ``m = beta P + (1 - beta) Q``,
    ``beta KL(P || m) + (1 - beta) KL(Q || m)``; ``beta = 0`` is FKL, ``beta = 1`` RKL (as
    :func:`arkd.losses.generalized_jsd`)."""
    from .functional import _log_mix

    check_unit_interval("beta", beta)
    mask = _check(student_logits, teacher, mask, temperature, reduction)
    log_Q, log_P, scatter = _counted(student_logits, teacher, mask, temperature)
    if beta == 0.0:
        values = _kl(log_P, log_Q)
    elif beta == 1.0:
        values = _kl(log_Q, log_P)
    else:
        log_m = _log_mix(log_P, log_Q, beta)
        values = beta * _kl(log_P, log_m) + (1.0 - beta) * _kl(log_Q, log_m)
    return masked_reduce(scatter(values), mask, reduction)


def js_divergence_topk(student_logits, teacher: TopKTeacher, mask=None, *, temperature=1.0, reduction="mean"):
    r"""Jensen-Shannon divergence between ``P`` and ``Q`` (:func:`generalized_jsd_topk` at ``beta = 0.5``)."""
    return generalized_jsd_topk(student_logits, teacher, mask, temperature=temperature, reduction=reduction, beta=0.5)
