"""The fast paths of the bidirectional KL ``alpha * KL(p||q) + (1 - alpha) * KL(q||p)`` (ARKD's loss).

``bidirectional_kl`` runs at every training step over ``[tokens, V]`` logits with V ~ 50k-150k, so it is not the naive
autograd composition (two ``log_softmax``, two ``kl_div`` and their saved intermediates). Two custom
``torch.autograd.Function`` classes process the tokens chunk by chunk, in plain PyTorch (CPU and GPU):

* :class:`BidirectionalKLFunction` (used by :func:`arkd.losses.bidirectional_kl`): for each chunk of tokens, one
  log-softmax per side gives both KLs and the analytic gradient with respect to the student logits,

  ``d loss / d z_q = [alpha * (q - p) + (1 - alpha) * q * (log q - log p - RKL)] / temperature``,

  written into a single gradient-sized buffer (the student logits' dtype). Nothing ``[tokens, V]`` is saved besides
  it; backward scales it by the incoming per-token gradient **in place** and returns it. The backward can therefore
  run once (``retain_graph=True`` with a second backward raises a clear error).
* :class:`FusedLinearBidirectionalKLFunction` (:func:`fused_linear_bidirectional_kl`): takes the student's final
  hidden states and output-layer weight and never materialises the ``[tokens, V]`` student logits: each chunk's logits
  are computed, turned into the loss and the gradient with respect to the chunk's hidden states, the weight and the
  bias, and dropped. Peak extra memory is one chunk of logits plus a weight-sized gradient accumulator.

Only counted tokens (``mask`` True) are computed at all: uncounted ones get loss 0 and gradient 0.

Teacher gradient: :func:`arkd.losses.bidirectional_kl` also returns the analytic gradient with respect to the teacher
logits when they require grad (a second buffer), ``[alpha * p * (log p - log q - FKL) + (1 - alpha) * (p - q)] / T``.
The fused-linear variant treats the teacher as frozen: its inputs are detached (no gradient reaches them).

Infinities: ``-inf`` logits are zero-probability entries. Where both sides are ``-inf`` the entry contributes 0 to
values and gradients. Where the student gives ``-inf`` to a token the teacher gives mass, FKL is ``+inf`` (true value),
and symmetrically RKL is ``+inf`` where the teacher gives ``-inf`` to a token the student gives mass; an infinite KL
makes the mix infinite, unless its weight is exactly 0 (``alpha = 0`` with an infinite FKL is plain RKL, and
``alpha = 1`` with an infinite RKL plain FKL, in values and gradients).
"""

from __future__ import annotations

import torch

from ._base import broadcast_token_weight, check_reduction, check_temperature, compute_dtype

CPU_CHUNK_ELEMENTS = 2**24
"""CPU default: chunks of 16M entries (333 tokens at V = 50257; four reusable float32 buffers of 64 MiB each).
Measured at 2048 x 50257 on 2 cores: 83-token chunks are about 20% faster on an idle machine but 2.5x slower when
another process competes for the cores (every elementwise op is a parallel region that waits for its slowest
thread, and small chunks mean many more ops); 333 tokens is close to the best in both cases."""
CUDA_CHUNK_ELEMENTS = 2**25
"""CUDA default: chunks of 32M entries (667 tokens at V = 50257; four 128 MiB float32 buffers); larger chunks mean
fewer kernel launches."""


def default_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Tokens per chunk when ``chunk_size=None``: ``CPU_CHUNK_ELEMENTS`` or ``CUDA_CHUNK_ELEMENTS`` divided by V."""
    elements = CUDA_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, elements // max(1, vocab_size))


_INF = float("inf")


def _resolve_chunk_size(chunk_size: int | None, vocab_size: int, device: torch.device) -> int:
    if chunk_size is None:
        return default_chunk_size(vocab_size, device)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (tokens per chunk) or None, got {chunk_size!r}")
    return chunk_size


class _Workspace:
    """Reusable ``[chunk, V]`` buffers for the chunk loop, allocated once per call.

    Allocating fresh temporaries at every chunk costs more than the arithmetic on CPU: blocks above glibc's mmap
    threshold (32 MiB) are mapped, page-faulted and unmapped each time. Reusing them keeps the loop in memory that is
    already mapped (and spares the CUDA caching allocator some work).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.buffers: list[torch.Tensor] = []

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """``count`` contiguous ``[rows, cols]`` views (their content is garbage)."""
        first = self.buffers[0] if self.buffers else None
        if first is None or first.shape[0] < rows or first.shape[1] != cols or first.dtype != dtype:
            self.buffers = [torch.empty(rows, cols, dtype=dtype, device=device) for _ in range(self.count)]
        return [buffer[:rows] for buffer in self.buffers]


def _log_softmax_into(x: torch.Tensor, temperature: float, log_out: torch.Tensor, prob_out: torch.Tensor) -> None:
    """``log_out = log_softmax(x / T)`` and ``prob_out = softmax(x / T)`` in the buffers' dtype, with one ``exp``.

    ``-inf`` entries give probability 0 and log-probability ``-inf``; a row that is entirely ``-inf`` gives NaN (such a
    token has no distribution; uncounted tokens are never computed).
    """
    row_max = x.amax(dim=-1, keepdim=True).to(log_out.dtype)  # exact in any dtype
    if x.dtype == log_out.dtype:
        torch.sub(x, row_max, out=log_out)
    else:  # upcast first: the difference of two bf16 numbers is not a bf16 number
        log_out.copy_(x).sub_(row_max)
    if temperature != 1.0:
        log_out.div_(temperature)
    torch.exp(log_out, out=prob_out)
    total = prob_out.sum(dim=-1, keepdim=True)
    prob_out.div_(total)
    log_out.sub_(total.log_())


def _chunk_bidirectional(
    student: torch.Tensor,
    teacher: torch.Tensor,
    alpha: torch.Tensor,
    temperature: float,
    student_grad: bool,
    teacher_grad: bool,
    workspace: _Workspace,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Bidirectional KL of one chunk and its analytic gradients.

    Args:
        student: ``[C, V]`` student logits (any float dtype; the math runs in float32, or float64 for float64 input).
        teacher: ``[C, V]`` teacher logits.
        alpha: ``[C]`` weight of FKL per row.
        temperature: divides both logits.
        student_grad / teacher_grad: whether to compute the gradient with respect to the (unscaled) logits.
        workspace: four reusable buffers (``_Workspace(4)``).

    Returns:
        ``loss [C]``, ``fkl [C]``, ``rkl [C]``, ``grad_student [C, V] | None``, ``grad_teacher [C, V] | None``
        (gradients in the compute dtype). ``grad_student`` lives in the workspace: use it before the next chunk.
    """
    dtype = compute_dtype(student.dtype)
    log_q, q, log_p, p = workspace.get(student.shape[0], student.shape[1], dtype, student.device)
    _log_softmax_into(student, temperature, log_q, q)
    _log_softmax_into(teacher, temperature, log_p, p)
    d = log_p.sub_(log_q)  # log p - log q; NaN where both are -inf, +-inf where exactly one is
    # 0 * (+-inf or NaN) = NaN marks an entry without mass on the weighting side: its true term is 0.
    f_terms = torch.mul(p, d, out=log_q).nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)  # log q is no longer needed
    r_terms = d.mul_(q).neg_().nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)
    fkl = f_terms.sum(dim=-1)
    rkl = r_terms.sum(dim=-1)
    alpha = alpha.to(dtype)
    a = alpha.unsqueeze(-1)
    # A zero weight drops its divergence even where it is infinite (alpha = 0 with an infinite FKL is plain RKL).
    loss = _weighted(alpha, fkl) + _weighted(1.0 - alpha, rkl)

    grad_teacher = None
    if teacher_grad:
        # d/dz_p: alpha * p * (log p - log q - FKL) + (1 - alpha) * (p - q)   (a fresh buffer: rarely needed)
        grad_teacher = torch.addcmul(f_terms, p, fkl.unsqueeze(-1), value=-1.0).mul_(a)
        _zero_rows(grad_teacher, alpha == 0)
        grad_teacher.add_(torch.sub(p, q).mul_(1.0 - a))
        if temperature != 1.0:
            grad_teacher.div_(temperature)

    grad_student = None
    if student_grad:
        # d/dz_q: alpha * (q - p) + (1 - alpha) * q * (log q - log p - RKL); r_terms = q * (log q - log p)
        grad_student = r_terms.addcmul_(q, rkl.unsqueeze(-1), value=-1.0).mul_(1.0 - a)
        _zero_rows(grad_student, alpha == 1)
        grad_student.add_(q.sub_(p).mul_(a))
        if temperature != 1.0:
            grad_student.div_(temperature)
    return loss, fkl, rkl, grad_student, grad_teacher


def _zero_rows(values: torch.Tensor, rows: torch.Tensor) -> None:
    """Set ``values[rows] = 0`` in place (``rows``: bool ``[C]``); free when no row is selected."""
    if bool(rows.any()):
        values[rows] = 0.0


def _weighted(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``weight * value`` with 0 where ``weight == 0`` (also when ``value`` is infinite)."""
    return torch.where(weight == 0, torch.zeros((), dtype=value.dtype, device=value.device), weight * value)


def _row_chunks(mask: torch.Tensor | None, n: int, chunk_size: int):
    """Yield ``(rows, index)``: a slice (everything counted) or an index tensor of counted rows, chunk by chunk."""
    if mask is None:
        for start in range(0, n, chunk_size):
            yield slice(start, min(start + chunk_size, n)), None
        return
    counted = mask.nonzero().squeeze(-1)
    for start in range(0, counted.numel(), chunk_size):
        index = counted[start : start + chunk_size]
        yield index, index


def _unravel(index: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Flat row indices → a tuple of per-dimension indices for ``shape`` (``torch.unravel_index`` for torch < 2.2)."""
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index = index // size
    return tuple(reversed(coords))


class _Rows:
    """Row access to ``[..., V]`` logits as if they were ``[N, V]``, without copying non-viewable layouts.

    ``logits[:, :-1]`` (the next-token shift) cannot be flattened to ``[N, V]`` without a full copy; rows are then
    gathered chunk by chunk through their multi-dimensional indices instead.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.token_shape = x.shape[:-1]
        try:
            self.flat = x.view(-1, x.shape[-1])
        except RuntimeError:
            self.flat = None

    def __getitem__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        if self.flat is not None:
            return self.flat[rows]
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=self.x.device)
        return self.x[_unravel(rows, self.token_shape)]


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
    def forward(ctx, student, teacher, alpha, mask, temperature, chunk_size, inplace_backward):
        v = student.shape[-1]
        n = student.shape[:-1].numel()
        dtype = compute_dtype(student.dtype)
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        new_buffer = torch.empty if mask is None else torch.zeros  # uncounted rows keep a zero gradient
        grad_s = new_buffer((n, v), dtype=student.dtype, device=student.device) if need_s else None
        grad_t = new_buffer((n, v), dtype=teacher.dtype, device=teacher.device) if need_t else None
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
        ctx.mark_non_differentiable(fkl, rkl)
        ctx.save_for_backward(
            None if grad_s is None else grad_s.view(student.shape),
            None if grad_t is None else grad_t.view(teacher.shape),
        )
        ctx.inplace_backward = inplace_backward
        ctx.used = False
        return loss, fkl, rkl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_fkl, _grad_rkl):
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
            scale = grad_loss.to(grad.dtype).reshape(grad.shape[:-1]).unsqueeze(-1)
            outputs.append(grad.mul_(scale) if ctx.inplace_backward else grad * scale)
        return outputs[0], outputs[1], None, None, None, None, None


def bidirectional_kl_fast(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    alpha: float | torch.Tensor,
    temperature: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token bidirectional KL, FKL and RKL ``[...]`` (uncounted tokens 0) through :class:`BidirectionalKLFunction`.

    Arguments as in :func:`arkd.losses.bidirectional_kl` (already checked by the caller except ``alpha`` and
    ``chunk_size``). Only the first output carries gradients.
    """
    token_shape = student_logits.shape[:-1]
    v = student_logits.shape[-1]
    chunk_size = _resolve_chunk_size(chunk_size, v, student_logits.device)
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
    )
    return loss.reshape(token_shape), fkl.reshape(token_shape), rkl.reshape(token_shape)


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
    ):
        dtype = compute_dtype(hidden.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        w_c = weight.to(dtype)
        b_c = None if bias is None else bias.to(dtype)
        workspace, logits_buffer = _Workspace(4), _Workspace(1)
        for rows, index in _row_chunks(mask, hidden.shape[0], chunk_size):
            h = hidden[rows].to(dtype)
            (logits,) = logits_buffer.get(h.shape[0], w_c.shape[0], dtype, h.device)
            if b_c is None:
                torch.mm(h, w_c.t(), out=logits)
            else:
                torch.addmm(b_c, h, w_c.t(), out=logits)
            if teacher_logits is not None:
                t_logits = teacher_logits[rows]
            else:
                t_logits = torch.nn.functional.linear(teacher_hidden[rows], teacher_weight, teacher_bias)
            loss, _, _, grad_logits, _ = _chunk_bidirectional(
                logits, t_logits, alpha[rows], temperature, need_h or need_w or need_b, False, workspace
            )
            del logits, t_logits
            tw = token_weight[rows].to(dtype)
            total = total + (tw * loss).sum()
            if grad_logits is None:
                continue
            # The per-token weights scale the small [C, H] / [C] factors, never the [C, V] gradient.
            if need_h:
                chunk_grad_h = (grad_logits @ w_c).mul_(tw.unsqueeze(-1)).to(grad_h.dtype)
                if index is None:
                    grad_h[rows] = chunk_grad_h
                else:
                    grad_h.index_copy_(0, index, chunk_grad_h)
            if need_w:
                grad_w.addmm_(grad_logits.t(), h * tw.unsqueeze(-1))
            if need_b:
                grad_b.add_(tw @ grad_logits)
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None, None, None


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

    Returns:
        A scalar tensor.

    Raises:
        ValueError: on inconsistent shapes, mismatched vocabulary sizes, a missing teacher or ``reduction="none"``.
    """
    check_temperature(temperature)
    check_reduction(reduction)
    if reduction == "none":
        raise ValueError('fused_linear_bidirectional_kl supports reduction "sum" or "mean", not "none"')
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"student_hidden [..., H] {tuple(student_hidden.shape)} and student_weight [V, H] "
            f"{tuple(student_weight.shape)} do not match"
        )
    token_shape = student_hidden.shape[:-1]
    v = student_weight.shape[0]
    chunk_size = _resolve_chunk_size(chunk_size, v, student_hidden.device)
    if student_bias is not None and student_bias.shape != (v,):
        raise ValueError(f"student_bias must have shape ({v},), got {tuple(student_bias.shape)}")
    if teacher_logits is not None:
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
        teacher_logits = teacher_logits.detach().reshape(-1, v)
    else:
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
        teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    if mask is not None:
        if mask.shape != token_shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the token shape is {tuple(token_shape)}")
        mask = mask.to(device=student_hidden.device, dtype=torch.bool).reshape(-1)
    dtype = compute_dtype(student_hidden.dtype)
    n = token_shape.numel()
    token_weight = torch.ones(n, dtype=dtype, device=student_hidden.device)
    if mask is not None:
        token_weight = token_weight * mask
    if reduction == "mean":
        token_weight = token_weight / token_weight.sum().clamp(min=1)
    alpha_t = broadcast_token_weight("alpha", alpha, token_shape, student_hidden.device).reshape(-1)
    total = FusedLinearBidirectionalKLFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        student_bias,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        alpha_t,
        token_weight,
        mask,
        float(temperature),
        chunk_size,
    )
    return total
