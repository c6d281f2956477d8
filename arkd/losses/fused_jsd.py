"""The fast paths of GKD's generalized Jensen-Shannon divergence (TRL's convention, ``beta`` in [0, 1]).

``m = beta p + (1 - beta) q`` (``p`` the teacher, ``q`` the student, both ``softmax(logits / T)``) and, for
``0 < beta < 1``, ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)``; ``beta = 0`` is FKL ``KL(p || q)`` and
``beta = 1`` RKL ``KL(q || p)`` (:func:`arkd.losses.generalized_jsd`, the reference, defines the ends the same way).

The naive composition (TRL's ``GKDTrainer.generalized_jsd_loss``: two full-vocabulary ``log_softmax``, a stacked
``[2, tokens, V]`` mixture, its ``logsumexp`` and two ``kl_div`` under autograd) keeps about ten ``[tokens, V]`` tensors
for its backward. Here the gradient is analytic,

  ``d JSD / d z_q = (1 - beta) q (log q - log m - KL(q || m)) / T``,
  ``d JSD / d z_p = beta p (log p - log m - KL(p || m)) / T`` (only when the teacher logits require grad),

computed chunk by chunk of counted tokens into a few reusable ``[chunk, V]`` buffers and written into one
gradient-sized buffer that backward scales in place (so backward runs once; a second one raises a clear error). At
the ends the bidirectional KL's fast path runs (``alpha = 1 - beta``), so ``beta`` 0 and 1 are exactly
:func:`arkd.losses.bidirectional_kl` at ``alpha`` 1 and 0.

:func:`fused_linear_generalized_jsd` takes the student's final hidden states and output layer instead of its logits
and never materialises the ``[tokens, V]`` student logits (each chunk's logits go into a reused buffer, then into the
gradients of the hidden states, weight and bias); the teacher is treated as frozen.

Only counted tokens (``mask`` True) contribute: uncounted ones get loss 0 and gradient 0, whatever their logits.
Non-finite values, as the bidirectional fast path and the naive composition: a NaN (or ``+inf``) logit of a counted
token makes that token's loss and gradient NaN; ``-inf`` logits are zero-probability entries. For ``0 < beta < 1`` the
divergence is always finite (``m >= beta p`` and ``m >= (1 - beta) q``): an entry where one side is ``-inf`` and the
other has mass contributes its finite share, an entry where both are ``-inf`` contributes 0 to values and gradients.
A counted token whose logits are all ``-inf`` has no distribution and gives NaN.
"""

from __future__ import annotations

import torch

from ._base import check_reduction, check_temperature, check_unit_interval, compute_dtype, masked_reduce
from .functional import bidirectional_kl
from .fused import fused_linear_bidirectional_kl
from .fused._chunks import (
    _gradient_buffers,
    _linear_gradients,
    _log_softmax_into,
    _resolve_chunk_size,
    _save_linear_gradients,
    _Workspace,
)
from .fused._rows import _row_chunks, _Rows

__all__ = ["GeneralizedJSDFunction", "fused_generalized_jsd", "fused_linear_generalized_jsd"]


def _chunk_jsd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    beta: float,
    temperature: float,
    student_grad: bool,
    teacher_grad: bool,
    buffers: _Workspace,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Generalized JSD (``0 < beta < 1``) of ``[C, V]`` logits and its analytic gradients.

    Returns ``loss [C]``, ``grad_student [C, V] | None`` (in a reusable buffer: use it before the next chunk) and
    ``grad_teacher [C, V] | None`` (fresh), in the compute dtype (float32, float64 for float64 input).
    """
    dtype = compute_dtype(student.dtype)
    log_q, q, log_p, p, log_m, m = buffers.get(student.shape[0], student.shape[1], dtype, student.device)
    _log_softmax_into(student, temperature, log_q, q)
    _log_softmax_into(teacher, temperature, log_p, p)
    # m = beta p + (1 - beta) q in probability space (no cancellation: a sum of non-negative terms), floored at the
    # smallest normal number: where both p and q underflow, q log(q / m) would otherwise meet log 0 next to a denormal
    # q > 0; such entries (p, q < 1e-38) change no value or gradient beyond 1e-36. NaN passes through the floor.
    torch.mul(p, beta, out=m).add_(q, alpha=1.0 - beta).clamp_min_(torch.finfo(dtype).tiny)
    torch.log(m, out=log_m)
    # An entry without mass on the weighting side contributes 0 (0 * -inf would be NaN). Such entries exist only where
    # a logit is -inf (an underflowed probability has a finite log), so the selection runs only then, and on the
    # probability, so that a NaN input (NaN probability) still propagates.
    f_terms = log_p.sub_(log_m).mul_(p)  # p (log p - log m)
    r_terms = log_q.sub_(log_m).mul_(q)  # q (log q - log m)
    if bool(torch.isneginf(teacher).any()):
        f_terms.masked_fill_(p == 0, 0.0)
    if bool(torch.isneginf(student).any()):
        r_terms.masked_fill_(q == 0, 0.0)
    kl_pm = f_terms.sum(dim=-1)
    kl_qm = r_terms.sum(dim=-1)
    loss = beta * kl_pm + (1.0 - beta) * kl_qm
    grad_teacher = None
    if teacher_grad:  # beta p (log p - log m - KL(p || m)) / T
        grad_teacher = f_terms.addcmul(p, kl_pm.unsqueeze(-1), value=-1.0).mul_(beta / temperature)
    grad_student = None
    if student_grad:  # (1 - beta) q (log q - log m - KL(q || m)) / T, in place of r_terms
        grad_student = r_terms.addcmul_(q, kl_qm.unsqueeze(-1), value=-1.0).mul_((1.0 - beta) / temperature)
    return loss, grad_student, grad_teacher


class GeneralizedJSDFunction(torch.autograd.Function):
    """Chunked generalized JSD (``0 < beta < 1``) over ``[..., V]`` logits with a precomputed analytic gradient.

    ``apply(student [..., V], teacher [..., V], mask [N] | None, beta, temperature, chunk_size, inplace_backward)``
    returns the per-token loss ``[N]`` (uncounted rows 0). With ``inplace_backward`` the saved gradient buffer is
    scaled in place, so backward runs once; pass False to keep it (``torch.autograd.gradcheck``).
    """

    @staticmethod
    def forward(ctx, student, teacher, mask, beta, temperature, chunk_size, inplace_backward):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = student.shape[:-1].numel()
        dtype = compute_dtype(student.dtype)
        grad_s, grad_t = _gradient_buffers(student, teacher, mask, need_s, need_t)
        s_rows, t_rows = _Rows(student), _Rows(teacher)
        loss = torch.zeros(n, dtype=dtype, device=student.device)
        buffers = _Workspace(6)
        for rows, index in _row_chunks(mask, n, chunk_size):
            out = _chunk_jsd(s_rows[rows], t_rows[rows], beta, temperature, need_s, need_t, buffers)
            for target, value in zip((loss, grad_s, grad_t), out):
                if target is None:
                    continue
                if index is None:
                    target[rows] = value
                else:
                    target.index_copy_(0, index, value.to(target.dtype))
        ctx.save_for_backward(
            None if grad_s is None else grad_s.view(student.shape),
            None if grad_t is None else grad_t.view(teacher.shape),
        )
        ctx.inplace_backward, ctx.used = inplace_backward, False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.inplace_backward and ctx.used:
            raise RuntimeError(
                "generalized_jsd's fast path scales its saved gradient buffer in place, so its backward can run only "
                "once; recompute the loss instead of calling backward twice with retain_graph=True"
            )
        ctx.used = True
        outputs = []
        for grad in ctx.saved_tensors:
            if grad is None:
                outputs.append(None)
                continue
            scale = grad_loss.to(grad.dtype).reshape(grad.shape[:-1]).unsqueeze(-1)
            if ctx.inplace_backward:
                outputs.append(grad if bool((grad_loss == 1).all()) else grad.mul_(scale))
            else:
                outputs.append(grad * scale)
        return outputs[0], outputs[1], None, None, None, None, None


def fused_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """GKD's generalized JSD through the fast chunked path; the values of :func:`arkd.losses.generalized_jsd`.

    Args:
        student_logits: ``[..., V]`` (``logits[:, :-1]`` layouts are read in place, never copied whole).
        teacher_logits: ``[..., V]``.
        mask: ``[...]`` bool, True = counted; uncounted tokens are skipped (value 0, gradient 0).
        beta: in [0, 1]: 0 is FKL, 1 is RKL (TRL's convention); the interior is ``beta KL(p || m) + (1 - beta)
            KL(q || m)``, ``m = beta p + (1 - beta) q``.
        temperature: divides both logits (no ``T^2`` factor).
        reduction: ``"none"`` | ``"sum"`` | ``"mean"``.
        chunk_size: tokens per chunk (None: 16M entries per buffer on CPU, 32M on CUDA); six ``[chunk, V]``
            float32 buffers plus the gradient are the extra memory.

    Tests check: values and gradients against the naive formula and TRL's ``generalized_jsd_loss`` over masks,
    temperatures and ``beta`` in {0, 0.1, 0.5, 0.9, 1}; ``gradcheck`` in float64; ``-inf`` and NaN semantics.
    """
    from ._base import check_logits

    check_reduction(reduction)
    check_temperature(temperature)
    check_unit_interval("beta", beta)
    mask = check_logits(student_logits, teacher_logits, mask)
    beta = float(beta)
    if beta in (0.0, 1.0):  # FKL or RKL: the bidirectional fast path at alpha = 1 - beta
        return bidirectional_kl(
            student_logits, teacher_logits, mask, alpha=1.0 - beta, temperature=temperature, reduction=reduction,
            chunk_size=chunk_size,
        )  # fmt: skip
    token_shape = student_logits.shape[:-1]
    chunk = _resolve_chunk_size(chunk_size, student_logits.shape[-1], student_logits.device)
    flat_mask = None if mask is None else mask.reshape(-1)
    loss = GeneralizedJSDFunction.apply(
        student_logits, teacher_logits, flat_mask, beta, float(temperature), chunk, True
    ).reshape(token_shape)
    return masked_reduce(loss, mask, reduction)


class _FusedLinearJSD(torch.autograd.Function):
    """``sum_i token_weight_i * JSD_i`` from hidden states (gradients computed in forward; backward scales them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, token_weight, mask, beta, temperature, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need = need_h or need_w or need_b
        dtype = compute_dtype(hidden.dtype)
        device = hidden.device
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        v = w.shape[0]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=dtype, device=device)
        buffers, logits_buffer = _Workspace(6), _Workspace(1)
        teacher_rows = _Rows(teacher_logits)
        for rows, index in _row_chunks(mask, hidden.shape[0], chunk_size):
            h = hidden[rows].to(dtype)
            (logits,) = logits_buffer.get(h.shape[0], v, dtype, device)
            if b is None:
                torch.mm(h, w.t(), out=logits)
            else:
                torch.addmm(b, h, w.t(), out=logits)
            loss, grad_logits, _ = _chunk_jsd(logits, teacher_rows[rows], beta, temperature, need, False, buffers)
            tw = token_weight[rows].to(dtype)
            total = total + (tw * loss).sum()
            if grad_logits is None:
                continue
            if need_h:  # the per-token weights scale the [C, H] factor, never the [C, V] gradient
                chunk_grad_h = (grad_logits @ w).mul_(tw.unsqueeze(-1)).to(grad_h.dtype)
                if index is None:
                    grad_h[rows] = chunk_grad_h
                else:
                    grad_h.index_copy_(0, index, chunk_grad_h)
            if need_w:
                grad_w.addmm_(grad_logits.t(), h * tw.unsqueeze(-1))
            if need_b:
                grad_b.add_(tw @ grad_logits)
        _save_linear_gradients(ctx, grad_h, grad_w, grad_b, weight, bias)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grads = _linear_gradients(ctx, grad_total)
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def fused_linear_generalized_jsd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalized JSD from the student's final hidden states, without materialising ``[tokens, V]`` student logits.

    Equal to ``fused_generalized_jsd(student_hidden @ student_weight.T + student_bias, teacher_logits, ...)`` in value
    and in the gradients with respect to ``student_hidden``, ``student_weight`` and ``student_bias``; the teacher is
    detached. ``beta`` 0 and 1 run :func:`arkd.losses.fused_linear_bidirectional_kl` at ``alpha`` 1 and 0.

    Args:
        student_hidden: ``[..., H]`` final hidden states (after the final norm).
        student_weight: ``[V, H]`` the output layer's weight.
        teacher_logits: ``[..., V]``.
        mask: ``[...]`` bool, True = counted (None: all).
        student_bias: ``[V]`` optional output-layer bias.
        beta, temperature, chunk_size: as :func:`fused_generalized_jsd`.
        reduction: ``"sum"`` or ``"mean"`` (a scalar).

    Raises:
        ValueError: on inconsistent shapes, mismatched vocabulary sizes or ``reduction="none"``.
    """
    check_reduction(reduction)
    check_temperature(temperature)
    check_unit_interval("beta", beta)
    if reduction == "none":
        raise ValueError('fused_linear_generalized_jsd supports reduction "sum" or "mean", not "none"')
    beta = float(beta)
    if beta in (0.0, 1.0):
        return fused_linear_bidirectional_kl(
            student_hidden, student_weight, teacher_logits, mask, student_bias=student_bias, alpha=1.0 - beta,
            temperature=temperature, reduction=reduction, chunk_size=chunk_size,
        )  # fmt: skip
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden [..., H] {tuple(student_hidden.shape)} and student_weight [V, H] "
            f"{tuple(student_weight.shape)} do not match"
        )
    token_shape = student_hidden.shape[:-1]
    v = student_weight.shape[0]
    if student_bias is not None and student_bias.shape != (v,):
        raise ValueError(f"student_bias must have shape ({v},), got {tuple(student_bias.shape)}")
    if teacher_logits.shape[-1] != v:
        raise ValueError(
            f"student_weight has vocabulary size {v} but teacher_logits has vocabulary size "
            f"{teacher_logits.shape[-1]}; slice them to a common size (arkd.losses.truncate_to_common_vocab)"
        )
    if teacher_logits.shape[:-1] != token_shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} does not match the student tokens {tuple(token_shape)}"
        )
    if mask is not None:
        if mask.shape != token_shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the token shape is {tuple(token_shape)}")
        mask = mask.to(device=student_hidden.device, dtype=torch.bool).reshape(-1)
    n = token_shape.numel()
    token_weight = torch.ones(n, dtype=compute_dtype(student_hidden.dtype), device=student_hidden.device)
    if mask is not None:
        token_weight = token_weight * mask
    if reduction == "mean":
        token_weight = token_weight / token_weight.sum().clamp(min=1)
    chunk = _resolve_chunk_size(chunk_size, v, student_hidden.device)
    return _FusedLinearJSD.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias, teacher_logits.detach(),
        token_weight,
        mask, beta, float(temperature), chunk,
    )  # fmt: skip
