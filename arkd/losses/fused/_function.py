"""The logits path: :class:`BidirectionalKLFunction`, the autograd Function of the bidirectional KL over ``[..., V]``
logits, its compiled forward and backward (one kernel call each over the counted rows) and its eager forward (chunk by
chunk, the gradient computed in forward), and :func:`bidirectional_kl_fast`, the entry of
:func:`arkd.losses.bidirectional_kl`."""

from __future__ import annotations

import torch

from .._base import broadcast_token_weight, compute_dtype
from ._chunks import _chunk_bidirectional, _gradient_buffers, _resolve_chunk_size, _Workspace
from ._compiled import _check_compiled, _CompileFailed, _kernel, compile_enabled
from ._kernels import _alpha_modes, _make_backward_kernel, _make_forward_kernel
from ._rows import _row_chunks, _RowLayout, _Rows


def _forward_compiled(student, teacher, alpha, mask, temperature):
    """Values of the logits path in one call of the compiled forward kernel over the counted rows.

    Returns ``(loss, fkl, rkl, state)`` (``state`` is what :func:`_backward_compiled` needs: per-row statistics, not
    a gradient), or None where the layouts allow no strided row view or a single row is counted (the eager path).
    """
    s_layout, t_layout = _RowLayout.of(student), _RowLayout.of(teacher)
    if s_layout is None or t_layout is None or not s_layout.same_rows(t_layout):
        return None
    n, v = alpha.shape[0], student.shape[-1]
    dtype = compute_dtype(student.dtype)
    device = student.device
    identity = s_layout.rows is None
    if mask is None:
        tokens = None
        rows = s_layout.rows  # None: every row, in order
    else:
        tokens = mask.nonzero().squeeze(-1)
        rows = tokens if identity else s_layout.rows[tokens]
    m = n if rows is None else rows.numel()
    if m == 1:
        return None
    loss = torch.zeros(n, dtype=dtype, device=device)
    fkl = torch.zeros(n, dtype=dtype, device=device)
    rkl = torch.zeros(n, dtype=dtype, device=device)
    state = {"m": m, "tokens": tokens, "rows": rows, "layouts": (s_layout, t_layout), "temperature": float(temperature)}
    state.update(alpha=alpha, mask=mask)
    if m == 0:
        return loss, fkl, rkl, state
    a = (alpha if tokens is None else alpha[tokens]).contiguous()
    indexed = rows is not None
    s_base, t_base = s_layout.base, t_layout.base
    signature = (device.type, device.index, v, student.dtype, teacher.dtype, s_base.stride(0), t_base.stride(0), dtype)
    signature += (float(temperature), indexed)
    kernel = _kernel(("forward", *signature), _make_forward_kernel, dtype, float(temperature), indexed)
    values = kernel(s_base, t_base, rows, a)
    for target, value in zip((loss, fkl, rkl), values):
        if tokens is None:
            target.copy_(value)
        else:
            target[tokens] = value
    state.update(signature=signature, a=a, stats=values[1:])
    return loss, fkl, rkl, state


def _backward_compiled(state, grad_loss, need_s, need_t, student, teacher):
    """The gradients of the compiled path: one read of the logits, one write of each gradient (scaled per token by
    ``grad_loss``), through the compiled backward kernel."""
    s_layout, t_layout = state["layouts"]
    total, v = s_layout.base.shape[0], student.shape[-1]
    device = student.device
    grad_s = torch.empty((total, v), dtype=student.dtype, device=device) if need_s else None
    grad_t = torch.empty((total, v), dtype=teacher.dtype, device=device) if need_t else None
    mask, tokens, rows = state["mask"], state["tokens"], state["rows"]
    if mask is not None:  # uncounted tokens get a zero gradient (the kernel never visits them)
        uncounted = (~mask).nonzero().squeeze(-1)
        uncounted = uncounted if s_layout.rows is None else s_layout.rows[uncounted]
        for grad in (grad_s, grad_t):
            if grad is not None:
                grad.index_fill_(0, uncounted, 0.0)
    if state["m"] > 0:
        use_f, use_r = _alpha_modes(state["alpha"], mask)
        signature = state["signature"]
        dtype = signature[7]
        key = ("backward", *signature, need_s, need_t, use_f, use_r)
        kernel = _kernel(key, _make_backward_kernel, dtype, state["temperature"], need_s, need_t, use_f, use_r,
                         rows is not None)  # fmt: skip
        fkl, rkl, cx, cy = state["stats"]
        scale = (grad_loss if tokens is None else grad_loss[tokens]).contiguous()
        kernel(s_layout.base, t_layout.base, rows, state["a"], cx, cy, fkl, rkl, scale, grad_s, grad_t)
    return (
        None if grad_s is None else s_layout.grad_view(grad_s, student),
        None if grad_t is None else t_layout.grad_view(grad_t, teacher),
    )


def _forward_eager(need_s, need_t, student, teacher, alpha, mask, temperature, chunk_size):
    """The logits path op by op (no compiler): counted rows only, gathered chunk by chunk into reusable buffers."""
    n = student.shape[:-1].numel()
    dtype = compute_dtype(student.dtype)
    grad_s, grad_t = _gradient_buffers(student, teacher, mask, need_s, need_t)
    student_rows, teacher_rows = _Rows(student), _Rows(teacher)
    loss = torch.zeros(n, dtype=dtype, device=student.device)
    fkl = torch.zeros(n, dtype=dtype, device=student.device)
    rkl = torch.zeros(n, dtype=dtype, device=student.device)
    workspace = _Workspace(4)
    for rows, index in _row_chunks(mask, n, chunk_size):
        out = _chunk_bidirectional(
            student_rows[rows], teacher_rows[rows], alpha[rows], temperature, need_s, need_t, workspace
        )
        for target, value in zip((loss, fkl, rkl, grad_s, grad_t), out):
            if target is None:
                continue
            if index is None:
                target[rows] = value
            else:
                target.index_copy_(0, index, value.to(target.dtype))
    return (
        loss,
        fkl,
        rkl,
        None if grad_s is None else grad_s.view(student.shape),
        None if grad_t is None else grad_t.view(teacher.shape),
    )


class BidirectionalKLFunction(torch.autograd.Function):
    """Chunked bidirectional KL over ``[..., V]`` logits with a precomputed analytic gradient.

    ``apply(student [..., V], teacher [..., V], alpha [N], mask [N] | None, temperature, chunk_size, inplace_backward)``
    (``N`` the number of tokens, ``alpha`` and ``mask`` flattened) returns ``(loss [N], fkl [N], rkl [N])``; ``fkl``
    and ``rkl`` are not differentiable. Uncounted rows give 0. Non-contiguous logits (``logits[:, :-1]``) are read
    chunk by chunk, never copied whole.
    With ``inplace_backward`` (the default of :func:`arkd.losses.bidirectional_kl`) the saved gradient buffer is
    scaled in place, so backward can run once; pass False to keep it (e.g. for ``torch.autograd.gradcheck``).
    """

    @staticmethod
    def forward(ctx, student, teacher, alpha, mask, temperature, chunk_size, inplace_backward, compiled=False):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.compiled_state = None
        ctx.eager_args = (alpha, mask, temperature, chunk_size)
        if compiled:
            try:
                out = _forward_compiled(student, teacher, alpha, mask, temperature)
            except _CompileFailed:
                out = None
            if out is not None:
                loss, fkl, rkl, ctx.compiled_state = out
                ctx.mark_non_differentiable(fkl, rkl)
                ctx.save_for_backward(student, teacher)  # read again by the backward kernel (never modified)
                return loss, fkl, rkl
        loss, fkl, rkl, grad_s, grad_t = _forward_eager(
            need_s, need_t, student, teacher, alpha, mask, temperature, chunk_size
        )
        ctx.mark_non_differentiable(fkl, rkl)
        ctx.save_for_backward(grad_s, grad_t)
        ctx.inplace_backward = inplace_backward
        ctx.used = False
        return loss, fkl, rkl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_fkl, _grad_rkl):
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.compiled_state is not None:
            student, teacher = ctx.saved_tensors
            try:
                grads = _backward_compiled(ctx.compiled_state, grad_loss, need_s, need_t, student, teacher)
            except _CompileFailed:  # recompute eagerly, then scale as the eager path does
                alpha, mask, temperature, chunk_size = ctx.eager_args
                _, _, _, grad_s, grad_t = _forward_eager(
                    need_s, need_t, student, teacher, alpha, mask, temperature, chunk_size
                )
                grads = [None if g is None else g.mul_(_row_scale(grad_loss, g)) for g in (grad_s, grad_t)]
            return grads[0], grads[1], None, None, None, None, None, None
        if ctx.inplace_backward and ctx.used:
            raise RuntimeError(
                "bidirectional_kl's fast path scales its saved gradient buffer in place, so its backward can run only "
                "once; recompute the loss instead of calling backward twice with retain_graph=True"
            )
        ctx.used = True
        grad_s, grad_t = ctx.saved_tensors
        outputs = []
        for grad in (grad_s, grad_t):
            if grad is None:
                outputs.append(None)
                continue
            scale = _row_scale(grad_loss, grad)
            outputs.append(grad.mul_(scale) if ctx.inplace_backward else grad * scale)
        return outputs[0], outputs[1], None, None, None, None, None, None


def _row_scale(grad_loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad_loss.to(grad.dtype).reshape(grad.shape[:-1]).unsqueeze(-1)


def bidirectional_kl_fast(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    alpha: float | torch.Tensor,
    temperature: float,
    chunk_size: int | None,
    compiled: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token bidirectional KL, FKL and RKL ``[...]`` (uncounted tokens 0) through :class:`BidirectionalKLFunction`.

    Arguments as in :func:`arkd.losses.bidirectional_kl` (already checked by the caller except ``alpha``,
    ``chunk_size`` and ``compiled``). Only the first output carries gradients.
    """
    token_shape = student_logits.shape[:-1]
    v = student_logits.shape[-1]
    chunk_size = _resolve_chunk_size(chunk_size, v, student_logits.device)
    _check_compiled(compiled)
    use_compiled = compile_enabled(compiled, token_shape.numel() * v, student_logits.device)
    alpha_t = broadcast_token_weight("alpha", alpha, token_shape, student_logits.device).reshape(-1)
    flat_mask = None if mask is None else mask.reshape(-1)
    loss, fkl, rkl = BidirectionalKLFunction.apply(
        student_logits,
        teacher_logits,
        alpha_t,
        flat_mask,
        float(temperature),
        chunk_size,
        True,
        use_compiled,
    )
    return loss.reshape(token_shape), fkl.reshape(token_shape), rkl.reshape(token_shape)
