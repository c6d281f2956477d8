"""Fused-linear: the bidirectional KL from the student's final hidden states and output layer, chunk by chunk of
counted tokens, without ever materialising the ``[tokens, V]`` student logits (:func:`fused_linear_bidirectional_kl`,
:class:`FusedLinearBidirectionalKLFunction`).

Each chunk's logits are computed into a reused buffer (the teacher's likewise, when it comes as hidden states), turned
into the loss and the gradient with respect to the logits by the chunk math (:mod:`._chunks`, eager) or the compiled
fused kernel (:mod:`._kernels`), then into the gradients of the hidden states, weight and bias. The teacher is frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._base import broadcast_token_weight, check_alpha, check_reduction, check_temperature, compute_dtype
from ._chunks import _chunk_bidirectional, _linear_gradients, _resolve_chunk_size, _save_linear_gradients, _Workspace
from ._compiled import _check_compiled, _CompileFailed, _kernel, compile_enabled
from ._kernels import _alpha_modes, _make_fused_kernel
from ._rows import _row_chunks


@dataclass(frozen=True)
class _Teacher:
    """The frozen teacher of one call: its ``logits [N, V]``, or its ``hidden [N, Ht]`` states with its output layer
    (``weight [V, Ht]``, ``bias [V] | None``), whose logits are computed chunk by chunk."""

    logits: torch.Tensor | None
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype if self.logits is not None else self.weight.dtype

    def chunk_logits(self, rows, count: int, buffer: _Workspace, device: torch.device) -> torch.Tensor:
        """The teacher logits of ``rows`` (``count`` of them): a view of the given logits, or computed into
        ``buffer`` (one buffer reused by every chunk)."""
        if self.logits is not None:
            return self.logits[rows]
        (out,) = buffer.get(count, self.weight.shape[0], self.dtype, device)
        if self.bias is None:
            torch.mm(self.hidden[rows], self.weight.t(), out=out)
        else:
            torch.addmm(self.bias, self.hidden[rows], self.weight.t(), out=out)
        return out


@dataclass(frozen=True)
class _Tokens:
    """The per-token inputs of one call: FKL weight ``alpha [N]``, ``token_weight [N]`` (what each counted token's
    loss is multiplied by), ``mask [N] | None``, and how they are computed: ``temperature`` and ``chunk_size``."""

    alpha: torch.Tensor
    token_weight: torch.Tensor
    mask: torch.Tensor | None
    temperature: float
    chunk_size: int


@dataclass
class _Grads:
    """The gradients one call accumulates (None: not requested): ``hidden`` in the hidden states' dtype, ``weight``
    and ``bias`` in the compute dtype."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def zeros(cls, hidden, weight, bias, needs: tuple[bool, bool, bool], dtype: torch.dtype) -> _Grads:
        need_h, need_w, need_b = needs
        return cls(
            torch.zeros_like(hidden) if need_h else None,
            torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None,
            torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None,
        )

    def add_chunk(self, grad_logits, h, w_c, tw, rows, index) -> None:
        """Add one chunk's share, from its logits gradient ``[C, V]``, inputs ``h [C, H]`` and token weights ``tw``.
        The per-token weights scale the small ``[C, H]`` / ``[C]`` factors, never the ``[C, V]`` gradient."""
        if self.hidden is not None:
            chunk_grad_h = (grad_logits @ w_c).mul_(tw.unsqueeze(-1)).to(self.hidden.dtype)
            if index is None:
                self.hidden[rows] = chunk_grad_h
            else:
                self.hidden.index_copy_(0, index, chunk_grad_h)
        if self.weight is not None:
            self.weight.addmm_(grad_logits.t(), h * tw.unsqueeze(-1))
        if self.bias is not None:
            self.bias.add_(tw @ grad_logits)


def _fused_linear_forward(hidden, weight, bias, teacher: _Teacher, tokens: _Tokens, needs, *, compiled: bool):
    """``(total, grad_hidden, grad_weight, grad_bias)`` of the fused-linear loss, chunk by chunk of counted rows.

    ``needs``: whether the gradients of hidden, weight and bias are requested. Each chunk's math runs through
    :func:`._chunks._chunk_bidirectional` (eager) or the compiled kernel (its row count is dynamic: one compilation
    serves every chunk, the last and shorter one included). The student-logits, teacher-logits and logits-gradient
    buffers are allocated once per call and reused by every chunk.
    """
    dtype = compute_dtype(hidden.dtype)
    device = hidden.device
    grads = _Grads.zeros(hidden, weight, bias, needs, dtype)
    need_grad = any(needs)
    total = torch.zeros((), dtype=dtype, device=device)
    w_c = weight.to(dtype)
    b_c = None if bias is None else bias.to(dtype)
    v = w_c.shape[0]
    workspace, logits_buffer, teacher_buffer, grad_buffer = _Workspace(4), _Workspace(1), _Workspace(1), _Workspace(1)
    kernel = _fused_kernel(teacher, tokens, need_grad, dtype, device, v) if compiled else None
    for rows, index in _row_chunks(tokens.mask, hidden.shape[0], tokens.chunk_size):
        h = hidden[rows].to(dtype)
        c = h.shape[0]
        (logits,) = logits_buffer.get(c, v, dtype, device)
        if b_c is None:
            torch.mm(h, w_c.t(), out=logits)
        else:
            torch.addmm(b_c, h, w_c.t(), out=logits)
        t_logits = teacher.chunk_logits(rows, c, teacher_buffer, device)
        if kernel is None or c == 1:  # a single row: the kernel's row count is dynamic from 2 on
            loss, _, _, grad_logits, _ = _chunk_bidirectional(
                logits, t_logits, tokens.alpha[rows], tokens.temperature, need_grad, False, workspace
            )
        else:
            grad_logits = grad_buffer.get(c, v, dtype, device)[0] if need_grad else None
            loss, _, _ = kernel(logits, t_logits, tokens.alpha[rows].contiguous(), grad_logits)
        del logits, t_logits
        tw = tokens.token_weight[rows].to(dtype)
        total = total + (tw * loss).sum()
        if grad_logits is not None:
            grads.add_chunk(grad_logits, h, w_c, tw, rows, index)
    return total, grads.hidden, grads.weight, grads.bias


def _fused_kernel(teacher: _Teacher, tokens: _Tokens, need_grad: bool, dtype, device, v: int):
    """The compiled fused kernel of one call, keyed by everything its code depends on."""
    use_f, use_r = _alpha_modes(tokens.alpha, tokens.mask)
    t_stride = v if teacher.logits is None or tokens.mask is not None else teacher.logits.stride(0)
    temperature = float(tokens.temperature)
    key = ("fused", device.type, device.index, v, dtype, teacher.dtype, t_stride, temperature, need_grad)
    key += (use_f, use_r)
    return _kernel(key, _make_fused_kernel, dtype, temperature, need_grad, use_f, use_r)


class FusedLinearBidirectionalKLFunction(torch.autograd.Function):
    """Weighted sum of the per-token bidirectional KL computed from hidden states, chunk by chunk.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, teacher_logits [N, V] | None, teacher_hidden [N, Ht] | None,
    teacher_weight [V, Ht] | None, teacher_bias [V] | None, alpha [N], token_weight [N], mask [N] | None, temperature,
    chunk_size)`` returns the scalar ``sum_i token_weight_i * loss_i`` over the counted rows (``token_weight`` is 1 for
    ``reduction="sum"``, ``1 / count`` for ``"mean"``); uncounted rows are never computed. Gradients with respect to
    hidden, weight and bias are computed in forward (the output is a scalar, so backward only scales them).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        alpha,
        token_weight,
        mask,
        temperature,
        chunk_size,
        compiled=False,
    ):
        # autograd's apply passes its arguments positionally; they are grouped here, once
        teacher = _Teacher(teacher_logits, teacher_hidden, teacher_weight, teacher_bias)
        tokens = _Tokens(alpha, token_weight, mask, temperature, chunk_size)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        out = None
        if compiled:
            try:
                out = _fused_linear_forward(hidden, weight, bias, teacher, tokens, needs, compiled=True)
            except _CompileFailed:
                out = None
        if out is None:
            out = _fused_linear_forward(hidden, weight, bias, teacher, tokens, needs, compiled=False)
        total, grad_h, grad_w, grad_b = out
        _save_linear_gradients(ctx, grad_h, grad_w, grad_b, weight, bias)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grads = _linear_gradients(ctx, grad_total)
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None, None, None


def fused_linear_bidirectional_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Bidirectional KL from the student's final hidden states, without materialising ``[tokens, V]`` student logits.

    ``loss = alpha * KL(p || q) + (1 - alpha) * KL(q || p)`` per token, ``q = softmax((h W^T + b) / T)`` the student,
    ``p`` the teacher (its logits, or ``softmax((h_t W_t^T + b_t) / T)`` from its hidden states), reduced over the
    counted tokens. Equal to ``bidirectional_kl(student_hidden @ student_weight.T + student_bias, teacher_logits, ...)``
    in value and in the gradients with respect to ``student_hidden``, ``student_weight`` and ``student_bias``.
    The teacher is treated as frozen: its tensors are detached and receive no gradient.

    Args:
        student_hidden: ``[..., H]`` final hidden states of the student (after the final norm).
        student_weight: ``[V, H]`` the student's output-layer (``lm_head``) weight.
        teacher_logits: ``[..., V]`` teacher logits; or None and give ``teacher_hidden`` and ``teacher_weight``.
        mask: ``[...]`` bool, True = counted; None counts every token.
        teacher_hidden: ``[..., Ht]`` teacher final hidden states (with ``teacher_weight [V, Ht]``).
        teacher_weight: ``[V, Ht]`` the teacher's output-layer weight.
        student_bias: ``[V]`` optional output-layer bias of the student.
        teacher_bias: ``[V]`` optional output-layer bias of the teacher.
        alpha: FKL weight: a float or a tensor broadcastable to the token shape (leading dimensions aligned); constant.
        temperature: divides both logits.
        reduction: ``"sum"`` or ``"mean"`` (a scalar; per-token values would need the full logits' gradients).
        chunk_size: tokens per chunk (None: :func:`default_chunk_size`); peak extra memory is a few
            ``[chunk_size, V]`` float32 buffers.
        compiled: run the per-chunk math through the ``torch.compile``-d chunk kernel (True), op by op (False), or
            decide from ``ARKD_COMPILE_LOSS`` and the size of the work (None; see :func:`compile_enabled`).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: on inconsistent shapes, mismatched vocabulary sizes, a missing teacher or ``reduction="none"``.
    """
    _check_compiled(compiled)
    check_temperature(temperature)
    check_reduction(reduction)
    check_alpha(alpha)
    if reduction == "none":
        raise ValueError('fused_linear_bidirectional_kl supports reduction "sum" or "mean", not "none"')
    token_shape = student_hidden.shape[:-1]
    v, chunk_size = _check_student(student_hidden, student_weight, student_bias, chunk_size)
    if teacher_logits is not None:
        teacher = _teacher_from_logits(teacher_logits, teacher_hidden, teacher_weight, token_shape, v)
    else:
        teacher = _teacher_from_hidden(teacher_hidden, teacher_weight, teacher_bias, token_shape, v)
    mask = _flat_mask(mask, token_shape, student_hidden.device)
    n = token_shape.numel()
    token_weight = _token_weight(mask, n, reduction, compute_dtype(student_hidden.dtype), student_hidden.device)
    alpha_t = broadcast_token_weight("alpha", alpha, token_shape, student_hidden.device).reshape(-1)
    total = FusedLinearBidirectionalKLFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher.logits,
        teacher.hidden,
        teacher.weight,
        teacher.bias,
        alpha_t,
        token_weight,
        mask,
        float(temperature),
        chunk_size,
        compile_enabled(compiled, n * v, student_hidden.device),
    )
    return total


def _check_student(hidden, weight, bias, chunk_size: int | None) -> tuple[int, int]:
    """``(V, tokens per chunk)`` of the student's output layer, checked against its hidden states."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"student_hidden [..., H] {tuple(hidden.shape)} and student_weight [V, H] "
            f"{tuple(weight.shape)} do not match"
        )
    v = weight.shape[0]
    chunk_size = _resolve_chunk_size(chunk_size, v, hidden.device)
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"student_bias must have shape ({v},), got {tuple(bias.shape)}")
    return v, chunk_size


def _teacher_from_logits(teacher_logits, teacher_hidden, teacher_weight, token_shape, v: int) -> _Teacher:
    """The teacher given as logits ``[..., V]``, checked against the student and detached, as ``[N, V]``."""
    if teacher_hidden is not None or teacher_weight is not None:
        raise ValueError("give either teacher_logits or teacher_hidden with teacher_weight, not both")
    if teacher_logits.shape[-1] != v:
        raise ValueError(
            f"student_weight has vocabulary size {v} but teacher_logits has vocabulary size "
            f"{teacher_logits.shape[-1]}; slice them to a common size (arkd.losses.truncate_to_common_vocab)"
        )
    if teacher_logits.shape[:-1] != token_shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} does not match the student tokens {tuple(token_shape)}"
        )
    return _Teacher(teacher_logits.detach().reshape(-1, v), None, None, None)


def _teacher_from_hidden(teacher_hidden, teacher_weight, teacher_bias, token_shape, v: int) -> _Teacher:
    """The teacher given as hidden states ``[..., Ht]`` and output layer, checked and detached (as ``[N, Ht]``)."""
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("give teacher_logits, or teacher_hidden together with teacher_weight")
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"teacher_hidden [..., Ht] {tuple(teacher_hidden.shape)} and teacher_weight [V, Ht] "
            f"{tuple(teacher_weight.shape)} do not match"
        )
    if teacher_weight.shape[0] != v:
        raise ValueError(
            f"student_weight has vocabulary size {v} but teacher_weight has vocabulary size "
            f"{teacher_weight.shape[0]}; slice the weights to a common size"
        )
    if teacher_hidden.shape[:-1] != token_shape:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} does not match the student tokens {tuple(token_shape)}"
        )
    return _Teacher(
        None,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
    )


def _flat_mask(mask, token_shape, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != token_shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the token shape is {tuple(token_shape)}")
    return mask.to(device=device, dtype=torch.bool).reshape(-1)


def _token_weight(mask, n: int, reduction: str, dtype: torch.dtype, device) -> torch.Tensor:
    """What each token's loss is multiplied by: 1 (``"sum"``) or ``1 / count`` (``"mean"``), 0 where uncounted."""
    token_weight = torch.ones(n, dtype=dtype, device=device)
    if mask is not None:
        token_weight = token_weight * mask
    if reduction == "mean":
        token_weight = token_weight / token_weight.sum().clamp(min=1)
    return token_weight
