"""The eager chunk math: a bidirectional KL and its analytic gradients over ``[C, V]`` logits, op by op into reusable
buffers (see :mod:`arkd.losses.fused` for the formulas and the NaN / ``-inf`` semantics), and how many tokens a chunk
holds."""

from __future__ import annotations

import torch

from .._base import compute_dtype

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


def _gradient_buffers(student, teacher, mask, need_s: bool, need_t: bool):
    """``(grad_s, grad_t)``: ``[N, V]`` gradient buffers of the logits that need one (None otherwise); zeros when a
    mask leaves rows uncounted (they keep a zero gradient), uninitialised when every row is written."""
    n, v = student.shape[:-1].numel(), student.shape[-1]
    new = torch.empty if mask is None else torch.zeros
    grad_s = new((n, v), dtype=student.dtype, device=student.device) if need_s else None
    grad_t = new((n, v), dtype=teacher.dtype, device=teacher.device) if need_t else None
    return grad_s, grad_t


def _save_linear_gradients(ctx, grad_h, grad_w, grad_b, weight, bias) -> None:
    """Save a fused-linear loss's precomputed gradients of hidden states, weight and bias, in the parameters'
    dtypes."""
    ctx.save_for_backward(
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


def _linear_gradients(ctx, grad_total: torch.Tensor) -> list:
    """The saved gradients of :func:`_save_linear_gradients` times the upstream gradient (as they are for
    ``loss.backward()`` itself: no pass over them)."""
    if bool(grad_total == 1):
        return list(ctx.saved_tensors)
    return [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]


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
    """Bidirectional KL of one chunk and its analytic gradients (the eager path, op by op into reusable buffers).

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
        A NaN or ``+inf`` logit makes its row's values and gradients NaN, as in the naive composition.
    """
    dtype = compute_dtype(student.dtype)
    log_q, q, log_p, p = workspace.get(student.shape[0], student.shape[1], dtype, student.device)
    _log_softmax_into(student, temperature, log_q, q)
    _log_softmax_into(teacher, temperature, log_p, p)
    d = log_q.sub_(log_p)  # log q - log p; NaN where both are -inf, +-inf where exactly one is
    # An entry without mass on the weighting side contributes 0, whatever the other side (0 * inf would be NaN);
    # selected on the probability, so a NaN input (NaN probability) still propagates.
    f_terms = torch.mul(p, d, out=log_p).masked_fill_(p == 0, 0.0)  # p (log q - log p); log p is no longer needed
    r_terms = d.mul_(q).masked_fill_(q == 0, 0.0)  # q (log q - log p)
    fkl = f_terms.sum(dim=-1).neg_()
    rkl = r_terms.sum(dim=-1)
    alpha = alpha.to(dtype)
    a = alpha.unsqueeze(-1)
    # A zero weight drops its divergence even where it is infinite (alpha = 0 with an infinite FKL is plain RKL).
    loss = _weighted(alpha, fkl) + _weighted(1.0 - alpha, rkl)

    grad_teacher = None
    if teacher_grad:
        # d/dz_p: alpha * p * (log p - log q - FKL) + (1 - alpha) * (p - q)   (a fresh buffer: rarely needed)
        grad_teacher = torch.add(f_terms, p * fkl.unsqueeze(-1)).mul_(a.neg())
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
