r"""Divergences between a student and a teacher next-token distribution, per token, with one masked reduction.

Every function has the signature

    ``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", <hyper-parameters>)``

* ``student_logits``, ``teacher_logits``: ``[..., V]`` (any float dtype; the math runs in float32, or float64 for
  float64 inputs). ``q = softmax(student_logits / temperature)`` is the student, ``p`` likewise the teacher.
* ``mask``: ``[...]`` bool, True = counted (None: all counted).
* ``reduction``: ``"none"`` returns the per-token values ``[...]`` (0 where not counted), ``"sum"`` their masked sum,
  ``"mean"`` the masked mean (0 with a gradient path when nothing is counted, never NaN). See :func:`masked_reduce`.
* Mismatched vocabulary sizes raise a ``ValueError`` naming both; :func:`truncate_to_common_vocab` slices logits of
  padded output layers to a common size.
* ``-inf`` logits are zero-probability entries and never produce NaN where both sides put no mass on them (the common
  case: padded or banned tokens). A divergence that is truly infinite (e.g. FKL where the student gives ``-inf`` to a
  token the teacher gives mass) is returned as ``+inf``.

Definitions and closed-form limits follow ``PROTOCOL.md`` (see ``docs/losses.md`` for the table and the papers).
"""

from __future__ import annotations

import math

import torch

from ._base import (
    broadcast_token_weight,
    check_alpha,
    check_logits,
    check_reduction,
    check_temperature,
    check_unit_interval,
    compute_dtype,
    masked_reduce,
    truncate_to_common_vocab,
    zero_uncounted,
)
from .fused import bidirectional_kl_fast

__all__ = [
    "adaptive_kl",
    "alpha_beta_divergence",
    "bidirectional_kl",
    "diversity_aware_rkl",
    "entropy_gated_kl",
    "forward_kl",
    "generalized_jsd",
    "js_divergence",
    "masked_reduce",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "taid_kl",
    "token_wise_kl",
    "total_variation",
    "truncate_to_common_vocab",
]

_NEG_INF = float("-inf")
AB_LIMIT_TOLERANCE = 1e-4
"""``alpha_beta_divergence`` uses the limiting form when ``|alpha|``, ``|beta|`` or ``|alpha + beta|`` is below this."""


# ----------------------------------------------------------------------------------------------------------- helpers
def _prepare(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check the arguments; return ``log q``, ``log p`` (``[..., V]``, compute dtype) and the bool mask."""
    check_reduction(reduction)
    check_temperature(temperature)
    mask = check_logits(student_logits, teacher_logits, mask)
    dtype = torch.promote_types(compute_dtype(student_logits.dtype), compute_dtype(teacher_logits.dtype))
    # uncounted rows are zeroed first: a NaN there reaches neither the value nor the gradient
    log_q = torch.log_softmax(zero_uncounted(student_logits.to(dtype), mask) / temperature, dim=-1)
    log_p = torch.log_softmax(zero_uncounted(teacher_logits.to(dtype), mask) / temperature, dim=-1)
    return log_q, log_p, mask


def _kl_entries(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a * (log a - log b)`` per entry, 0 where ``a == 0`` (no NaN in values or gradients); ``+inf`` where
    ``a > 0 = b``."""
    a = log_a.exp()
    support = a > 0
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    # Both logs are replaced outside a's support so that no 0 * inf appears, not even in the unused branch.
    return a * (torch.where(support, log_a, zero) - torch.where(support, log_b, zero))


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b)`` over the last dimension, from log-probabilities ``[..., V]`` → ``[...]``."""
    return _kl_entries(log_a, log_b).sum(dim=-1)


def _both_zero(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p == _NEG_INF) & (log_q == _NEG_INF)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` for ``0 < w < 1``; ``-inf`` (with zero gradient) where both are 0."""
    both = _both_zero(log_a, log_b)
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    log_a, log_b = torch.where(both, zero, log_a), torch.where(both, zero, log_b)
    mixed = torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))
    return torch.where(both, torch.full((), _NEG_INF, dtype=log_a.dtype, device=log_a.device), mixed)


def _safe_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``log p - log q`` with 0 where both are ``-inf`` (instead of NaN)."""
    both = _both_zero(log_p, log_q)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    return torch.where(both, zero, log_p) - torch.where(both, zero, log_q)


def _entropy(log_a: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``-sum a log a`` over the last dimension (0 log 0 = 0)."""
    a = log_a.exp()
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    return -(a * torch.where(a > 0, log_a, zero)).sum(dim=-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate on both sides of ``-log 2``.

    ``x`` is capped just below 0 so that a probability that rounds to exactly 1 gives a finite value (about -87 in
    float32) and a finite gradient instead of ``log 0``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _check_number(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# ------------------------------------------------------------------------------------------------------- divergences
def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Forward KL, mass-covering: ``KL(p || q) = sum_v p_v log(p_v / q_v)`` (Hinton et al. 2015, "KD").

    Shapes: logits ``[..., V]``, mask ``[...]``; returns ``[...]`` (``"none"``) or a scalar.
    Tests check: ``torch.nn.functional.kl_div``, a naive formula, 0 iff p = q, >= 0.
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    return masked_reduce(_kl(log_p, log_q), mask, reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Reverse KL, mode-seeking: ``KL(q || p) = sum_v q_v log(q_v / p_v)`` (MiniLLM, Gu et al. 2024, uses it).

    Shapes: logits ``[..., V]``, mask ``[...]``; returns ``[...]`` (``"none"``) or a scalar.
    Tests check: ``torch.nn.functional.kl_div``, a naive formula, 0 iff p = q, >= 0.
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    return masked_reduce(_kl(log_q, log_p), mask, reduction)


def bidirectional_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    alpha: float | torch.Tensor = 0.5,
    chunk_size: int | None = None,
    return_components: bool = False,
    compiled: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""ARKD's bidirectional KL ``alpha * KL(p || q) + (1 - alpha) * KL(q || p)`` through the fast chunked path.

    The gradient with respect to the student logits is analytic,
    ``[alpha (q - p) + (1 - alpha) q (log q - log p - RKL)] / temperature``, computed chunk by chunk of
    ``chunk_size`` tokens with one log-softmax per side and kept in a single gradient-sized buffer
    (:class:`arkd.losses.fused.BidirectionalKLFunction`); backward can run once per forward. When
    ``teacher_logits`` requires grad, its analytic gradient is computed too (a second buffer); a frozen teacher
    (the normal case) costs nothing.

    Args:
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]``.
        mask: ``[...]`` bool, True = counted; uncounted tokens are skipped entirely (value 0, gradient 0).
        temperature: divides both logits (no ``T^2`` factor is applied).
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.
        alpha: FKL weight in [0, 1]: a float, or a tensor whose dimensions align with the leading token dimensions
            (``[]``, per sequence ``[B]`` or ``[B, 1]``, per token ``[B, T]``). A constant: no gradient flows into it.
        chunk_size: tokens per chunk (peak extra memory: a few ``[chunk_size, V]`` float32 buffers); None picks
            :func:`arkd.losses.fused.default_chunk_size` (16 MiB buffers on CPU, 128 MiB on CUDA).
        return_components: also return FKL and RKL (detached, reduced the same way) for logging.
        compiled: True runs the per-chunk math through one ``torch.compile``-d kernel (fixed window shape: one
            compilation serves every token count), False op by op; None (default) compiles when
            ``ARKD_COMPILE_LOSS`` is unset/``auto`` and tokens x V >= ``arkd.losses.fused.COMPILE_MIN_ELEMENTS``, or
            as that variable says (``0`` never, ``1`` always). A failed compilation warns once and falls back.

    Returns:
        The loss (``[...]`` or a scalar), or ``(loss, fkl, rkl)`` with ``return_components``.

    Tests check: ``alpha=1`` → FKL, ``alpha=0`` → RKL; values and gradients equal the naive autograd composition
    over odd shapes, masks, temperatures, and alpha per batch / sequence / token; ``gradcheck`` in float64.
    """
    check_reduction(reduction)
    check_temperature(temperature)
    mask = check_logits(student_logits, teacher_logits, mask)
    check_alpha(alpha)
    loss, fkl, rkl = bidirectional_kl_fast(
        student_logits, teacher_logits, mask, alpha, temperature, chunk_size, compiled
    )
    loss = masked_reduce(loss, mask, reduction)
    if not return_components:
        return loss
    return loss, masked_reduce(fkl, mask, reduction), masked_reduce(rkl, mask, reduction)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    beta: float = 0.5,
) -> torch.Tensor:
    r"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024), in TRL's convention.

    ``m = beta p + (1 - beta) q``; ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)`` for ``0 < beta < 1``;
    ``beta = 0`` is defined as FKL ``KL(p || q)`` and ``beta = 1`` as RKL ``KL(q || p)`` (the interior formula itself
    tends to 0 at both ends). Tests check: both endpoints, ``beta = 0.5`` = :func:`js_divergence`, a naive formula.
    """
    check_unit_interval("beta", beta)
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    if beta == 0.0:
        values = _kl(log_p, log_q)
    elif beta == 1.0:
        values = _kl(log_q, log_p)
    else:
        log_m = _log_mix(log_p, log_q, beta)
        values = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return masked_reduce(values, mask, reduction)


def js_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Jensen-Shannon divergence ``(KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``.

    Tests check: symmetric in p and q, ``<= log 2``, equal to ``generalized_jsd(beta=0.5)`` and a naive formula.
    """
    return generalized_jsd(student_logits, teacher_logits, mask, temperature=temperature, reduction=reduction, beta=0.5)


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Total variation distance ``TVD = 1/2 sum_v |p_v - q_v|`` (used by DistiLLM / Wen et al. 2023).

    Tests check: symmetric, ``<= 1``, 0 iff p = q, a naive formula.
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    values = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    return masked_reduce(values, mask, reduction)


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    skew: float = 0.1,
) -> torch.Tensor:
    r"""Skew forward KL of DistiLLM (Ko et al. 2024, "SKL"): ``KL(p || skew p + (1 - skew) q)``, ``skew`` in [0, 1).

    Tests check: ``skew = 0`` → FKL, a naive formula, finite where q has zeros that p does not.
    """
    check_unit_interval("skew", skew, open_high=True)
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    log_m = log_q if skew == 0.0 else _log_mix(log_p, log_q, skew)
    return masked_reduce(_kl(log_p, log_m), mask, reduction)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    skew: float = 0.1,
) -> torch.Tensor:
    r"""Skew reverse KL of DistiLLM (Ko et al. 2024, "SRKL"): ``KL(q || skew q + (1 - skew) p)``, ``skew`` in [0, 1).

    Tests check: ``skew = 0`` → RKL, a naive formula.
    """
    check_unit_interval("skew", skew, open_high=True)
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    log_m = log_p if skew == 0.0 else _log_mix(log_q, log_p, skew)
    return masked_reduce(_kl(log_q, log_m), mask, reduction)


def adaptive_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    mu: float = 0.5,
) -> torch.Tensor:
    r"""Adaptive KL (AKL, Wu et al. 2025, arXiv 2404.02657): FKL and RKL weighted by head and tail gaps.

    Per token, sort the teacher's ``p`` descending; the head H holds the top tokens whose cumulative teacher mass is
    ``<= mu`` (the top-1 always in H). With ``g_head = sum_{v in H} |p_v - q_v|`` and ``g_tail`` the same over the
    rest (both computed without gradient), ``AKL = g_head / (g_head + g_tail) FKL + g_tail / (g_head + g_tail) RKL``
    (0.5 / 0.5 when both gaps are 0). Head and tail are built in the sorted index space, the same as the gaps.
    Tests check: against a naive per-token loop written in the test; ``p = q`` gives 0.
    """
    check_unit_interval("mu", mu)
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    with torch.no_grad():
        p_sorted, order = log_p.exp().sort(dim=-1, descending=True)
        gaps = (p_sorted - log_q.exp().gather(-1, order)).abs()  # sorted index space, like the head mask
        head = p_sorted.cumsum(dim=-1) <= mu
        head[..., 0] = True
        g_head = (gaps * head).sum(dim=-1)
        g_tail = (gaps * ~head).sum(dim=-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp(min=torch.finfo(total.dtype).tiny), 0.5)
    values = w_head * _kl(log_p, log_q) + (1.0 - w_head) * _kl(log_q, log_p)
    return masked_reduce(values, mask, reduction)


def token_wise_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Token-wise distillation (ToDi, Jung et al. 2025, arXiv 2505.16297).

    ``w_v = sigmoid(log p_v - log q_v)`` (no gradient);
    ``ToDi = sum_v [w_v p_v log(p_v / q_v) + (1 - w_v) q_v log(q_v / p_v)]``.
    Tests check: a naive formula (with ``w = p / (p + q)``), 0 iff p = q, no gradient through ``w``.
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    w = torch.sigmoid(_safe_log_ratio(log_p, log_q)).detach()
    values = (w * _kl_entries(log_p, log_q) + (1.0 - w) * _kl_entries(log_q, log_p)).sum(dim=-1)
    return masked_reduce(values, mask, reduction)


def alpha_beta_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    alpha: float = 0.5,
    beta: float = 0.5,
) -> torch.Tensor:
    r"""Alpha-beta divergence of ABKD (Wang et al. 2025, arXiv 2505.04560; Cichocki et al. 2011).

    ``D = -1/(a b) sum_v [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)]`` (``a = alpha``, ``b = beta``)
    with the limiting forms (used when the quantity is within ``AB_LIMIT_TOLERANCE`` of 0):

    * ``beta = 0``: ``1/alpha^2 sum [p^alpha log(p^alpha / q^alpha) - p^alpha + q^alpha]``
    * ``alpha = 0``: ``1/beta^2 sum [q^beta log(q^beta / p^beta) - q^beta + p^beta]``
    * ``alpha + beta = 0``: ``1/alpha^2 sum [log(q^alpha / p^alpha) + (q^alpha / p^alpha)^(-1) - 1]``
    * ``alpha = beta = 0``: ``1/2 sum (log p - log q)^2``

    Tests check: ``(1, 0)`` → FKL, ``(0, 1)`` → RKL, continuity of every limiting form, a naive formula.
    """
    _check_number("alpha", alpha)
    _check_number("beta", beta)
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    # Entries where both sides are 0 contribute 0 in every form; give them p = q = 1 (also a zero, with zero slope).
    both = _both_zero(log_p, log_q)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    lp = torch.where(both, zero, log_p)
    lq = torch.where(both, zero, log_q)
    a, b, tol = float(alpha), float(beta), AB_LIMIT_TOLERANCE
    if abs(a) < tol and abs(b) < tol:
        entries = 0.5 * (lp - lq).square()
    elif abs(b) < tol:
        entries = (_kl_entries(a * lp, a * lq) - (a * lp).exp() + (a * lq).exp()) / a**2
    elif abs(a) < tol:
        entries = (_kl_entries(b * lq, b * lp) - (b * lq).exp() + (b * lp).exp()) / b**2
    elif abs(a + b) < tol:
        entries = (a * (lq - lp) + (a * (lp - lq)).exp() - 1.0) / a**2
    else:
        s = a + b
        entries = -((a * lp + b * lq).exp() - a / s * (s * lp).exp() - b / s * (s * lq).exp()) / (a * b)
    return masked_reduce(entries.sum(dim=-1), mask, reduction)


def entropy_gated_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    weight: float = 3.0,
) -> torch.Tensor:
    r"""Entropy-gated bidirectional KL (BDKD, Amara et al., arXiv 2212.12965): ``w_f FKL + w_r RKL`` per token.

    ``w_f = weight`` where ``H(p) > H(q)`` (else 1), ``w_r = weight`` where ``H(q) > H(p)`` (else 1); the entropies
    are compared without gradient. Tests check: a naive formula per token, both gates, equal entropies → FKL + RKL.
    """
    _check_number("weight", weight)
    if weight <= 0:
        raise ValueError(f"weight must be > 0, got {weight!r}")
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    with torch.no_grad():
        h_p, h_q = _entropy(log_p), _entropy(log_q)
        w_f = torch.where(h_p > h_q, weight, 1.0).to(log_p.dtype)
        w_r = torch.where(h_q > h_p, weight, 1.0).to(log_p.dtype)
    values = w_f * _kl(log_p, log_q) + w_r * _kl(log_q, log_p)
    return masked_reduce(values, mask, reduction)


def diversity_aware_rkl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    target_ids: torch.Tensor,
    gamma: float | torch.Tensor = 0.5,
) -> torch.Tensor:
    r"""Diversity-aware reverse KL (DRKL, Luong et al. 2026, arXiv 2604.00223).

    With the target token ``y``: binary parts ``b_q = (q_y, 1 - q_y)``, ``b_p = (p_y, 1 - p_y)``; non-target parts
    renormalised, ``q_hat = q_{!y} / (1 - q_y)``, ``p_hat`` likewise. RKL decomposes exactly as
    ``KL(b_q || b_p) + (1 - q_y) KL(q_hat || p_hat)``; DRKL replaces the weight ``1 - q_y`` by a constant ``gamma``:
    ``DRKL = KL(b_q || b_p) + gamma KL(q_hat || p_hat)``.

    Args:
        target_ids: ``[...]`` long, the target token at each position; negative ids (e.g. the ``-100`` of labels)
            are not counted. Ids ``>= V`` raise a ``ValueError``.
        gamma: the non-target weight: a float, or a tensor aligned with the leading token dimensions; constant
            (no gradient). Where the student puts all its mass on ``y`` the non-target part is 0.

    Tests check: ``gamma = (1 - q_y)`` (detached) reproduces RKL's value; a naive formula.
    """
    log_q, log_p, mask = _prepare(student_logits, teacher_logits, mask, temperature, reduction)
    if not torch.is_tensor(target_ids) or target_ids.shape != log_q.shape[:-1]:
        shape = tuple(target_ids.shape) if torch.is_tensor(target_ids) else type(target_ids).__name__
        raise ValueError(f"target_ids must be a tensor of the token shape {tuple(log_q.shape[:-1])}, got {shape}")
    if torch.is_floating_point(target_ids):
        raise ValueError(f"target_ids must hold integer token ids, got dtype {target_ids.dtype}")
    if not torch.is_tensor(gamma):
        _check_number("gamma", gamma)
    v = log_q.shape[-1]
    target_ids = target_ids.to(log_q.device)
    if bool((target_ids >= v).any()):
        raise ValueError(f"target_ids must be < the vocabulary size {v}, got a maximum of {int(target_ids.max())}")
    valid = target_ids >= 0
    mask = valid if mask is None else mask & valid
    y = target_ids.clamp(min=0).unsqueeze(-1)
    lq_y = log_q.gather(-1, y).squeeze(-1)
    lp_y = log_p.gather(-1, y).squeeze(-1)
    l1q, l1p = _log1mexp(lq_y), _log1mexp(lp_y)
    binary = _kl_entries(lq_y, lp_y) + _kl_entries(l1q, l1p)
    # Non-target distributions: the target column is removed (-inf on both sides contributes 0).
    is_target = torch.zeros_like(log_q, dtype=torch.bool).scatter_(-1, y, True)
    has_rest = lq_y < -torch.finfo(lq_y.dtype).tiny  # q_y rounds to 1: no non-target mass to renormalise
    zero = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
    neg_inf = torch.full((), _NEG_INF, dtype=log_q.dtype, device=log_q.device)
    log_q_hat = torch.where(is_target, neg_inf, log_q - torch.where(has_rest, l1q, zero).unsqueeze(-1))
    log_p_hat = torch.where(is_target, neg_inf, log_p - l1p.unsqueeze(-1))
    rest = torch.where(has_rest, _kl(log_q_hat, log_p_hat), zero)
    gamma_t = broadcast_token_weight("gamma", gamma, log_q.shape[:-1], log_q.device).to(log_q.dtype)
    return masked_reduce(binary + gamma_t * rest, mask, reduction)


def taid_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    t: float = 0.4,
) -> torch.Tensor:
    r"""TAID's interpolated KL (Shing et al. 2025, arXiv 2501.16937): ``KL(p_t || q)``.

    The target interpolates in logit space, ``p_t = softmax((1 - t) stopgrad(z_q) + t z_p)`` with ``z = logits / T``;
    ``t`` in [0, 1] rises during training (see :class:`arkd.losses.TAIDLoss` for the adaptive schedule).
    Tests check: ``t = 1`` → FKL, ``t = 0`` → 0, a naive formula, no gradient through the student's target part.
    """
    check_unit_interval("t", t)
    check_reduction(reduction)
    check_temperature(temperature)
    mask = check_logits(student_logits, teacher_logits, mask)
    dtype = torch.promote_types(compute_dtype(student_logits.dtype), compute_dtype(teacher_logits.dtype))
    z_q = zero_uncounted(student_logits.to(dtype), mask) / temperature
    z_p = zero_uncounted(teacher_logits.to(dtype), mask) / temperature
    if t == 1.0:
        z_t = z_p
    elif t == 0.0:
        z_t = z_q.detach()
    else:  # -inf on either side stays -inf (a product 0 * -inf never appears for 0 < t < 1)
        z_t = (1.0 - t) * z_q.detach() + t * z_p
    values = _kl(torch.log_softmax(z_t, dim=-1), torch.log_softmax(z_q, dim=-1))
    return masked_reduce(values, mask, reduction)
