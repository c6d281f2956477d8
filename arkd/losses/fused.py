"""The fast paths of the bidirectional KL ``alpha * KL(p||q) + (1 - alpha) * KL(q||p)`` (ARKD's loss).

``bidirectional_kl`` runs at every training step over ``[tokens, V]`` logits with V ~ 50k-150k, so it is not the naive
autograd composition (two ``log_softmax``, two ``kl_div`` and their saved intermediates). Two custom
``torch.autograd.Function`` classes compute the analytic gradients,

  ``d loss / d z_q = [alpha * (q - p) + (1 - alpha) * q * (log q - log p - RKL)] / temperature``,
  ``d loss / d z_p = [alpha * p * (log p - log q - FKL) + (1 - alpha) * (p - q)] / temperature`` (only when the
  teacher logits require grad),

each in one of two ways:

* **Compiled** (the default for large inputs, see :func:`compile_enabled`; ``compiled=`` and ``ARKD_COMPILE_LOSS``
  switch it): the per-row math is one ``torch.compile``-d kernel whose row count is dynamic, so one compilation
  serves every token count and nothing recompiles from step to step. :class:`BidirectionalKLFunction`'s forward
  kernel reads the logits twice (row maxima, then per-row sums that give the log-normalisers and both KLs) and keeps
  only ``[tokens]`` statistics; its backward kernel reads them once more and writes the gradient once, already scaled
  by the incoming per-token gradient. Nothing ``[tokens, V]`` is allocated besides the gradient itself. Masked tokens
  and ``logits[:, :-1]`` layouts are read in place through row indices, never gathered into copies. When alpha is
  exactly 0 (or 1) on every counted token the unused divergence's gradient terms are not computed. A failed
  compilation warns once and falls back to the eager path.
* **Eager** (small inputs, ``compiled=False``, or no compiler): chunk by chunk of ``chunk_size`` counted tokens, one
  log-softmax per side into four reusable buffers gives both KLs and the gradient, written into one gradient-sized
  buffer that backward scales **in place** (so backward runs once; a second one raises a clear error).

:class:`FusedLinearBidirectionalKLFunction` (:func:`fused_linear_bidirectional_kl`) takes the student's final hidden
states and output-layer weight and never materialises the ``[tokens, V]`` student logits: each chunk's logits are
computed into a reused buffer (the teacher's likewise), turned into the loss and the gradient with respect to the
logits (the compiled kernel, or the eager chunk math), then into the gradients of the hidden states, weight and bias.
Peak extra memory is a few chunk buffers plus a weight-sized gradient accumulator. The teacher is treated as frozen.

Only counted tokens (``mask`` True) contribute: uncounted ones get loss 0 and gradient 0, whatever their logits.

Non-finite values: a NaN (or ``+inf``) logit of a counted token makes that token's loss and gradient NaN, on every
path and reduction, exactly like the naive composition; nothing replaces it by 0. ``-inf`` logits are
zero-probability entries: where both sides are ``-inf`` the entry contributes 0 to values and gradients. Where the
student gives ``-inf`` to a token the teacher gives mass, FKL is ``+inf`` (the true value), and symmetrically RKL is
``+inf`` where the teacher gives ``-inf`` to a token the student gives mass; an infinite KL makes the mix infinite,
unless its weight is exactly 0 (``alpha = 0`` with an infinite FKL is plain RKL, and ``alpha = 1`` with an infinite RKL
plain FKL, in values and gradients).
"""

from __future__ import annotations

import contextlib
import os
import time
import types
import warnings

import torch

from ._base import broadcast_token_weight, check_alpha, check_reduction, check_temperature, compute_dtype

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


# ---------------------------------------------------------------------------------------------- the compiled path
COMPILE_ENV = "ARKD_COMPILE_LOSS"
"""Environment switch of the compiled kernel: ``0`` (or ``false``/``off``/``no``) never compiles, ``1`` (``true``/
``on``/``yes``) compiles whatever the size; unset or ``auto`` compiles when the work reaches
``COMPILE_MIN_ELEMENTS``."""
COMPILE_MIN_ELEMENTS = 2**22
"""``compiled=None`` (auto) compiles when tokens x V reaches this (4M entries, e.g. 84 tokens at V = 50257): below
it the one-time compilation (seconds) costs more than it can save, and the eager path is fast enough."""

_KERNELS: dict[tuple, _Kernel] = {}
_COMPILE_FAILED: list[str] = []  # the reason, once a compilation failed: everything runs eagerly from then on


class _CompileFailed(Exception):
    """Raised inside a forward when a kernel could not be compiled; the caller reruns the eager path."""


def compile_enabled(compiled: bool | None, elements: int, device: torch.device) -> bool:
    """Whether a call uses the compiled kernel.

    ``compiled`` True/False forces it (True still runs eagerly once a compilation failed in this process, or where
    compilation is impossible: other devices, inside an outer ``torch.compile``); None follows ``ARKD_COMPILE_LOSS``
    and, in auto mode, compiles when ``elements`` (tokens x V) reaches ``COMPILE_MIN_ELEMENTS``.
    """
    if compiled is False or _COMPILE_FAILED or device.type not in ("cpu", "cuda"):
        return False
    if not hasattr(torch, "compile") or _is_compiling():
        return False
    if compiled is True:
        return True
    env = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if env in ("0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    if env not in ("", "auto"):
        raise ValueError(f"{COMPILE_ENV} must be 0, 1 or auto, got {os.environ[COMPILE_ENV]!r}")
    return elements >= COMPILE_MIN_ELEMENTS


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def compiled_kernels() -> dict[tuple, float]:
    """The kernels this process compiled: ``{key: seconds its first call took}`` (each compiles once)."""
    return {key: k.compile_seconds for key, k in _KERNELS.items() if k.compiled_ok}


def _row_stats(x: torch.Tensor, y: torch.Tensor, want_fkl: bool = True, want_rkl: bool = True):
    """Per-row log-normalisers and KLs of ``[M, V]`` (temperature-scaled, compute dtype) logits, for the kernels.

    ``RKL = E_q[a_x - a_y] - log Z_x + log Z_y`` with ``a = logits - rowmax`` and ``Z = sum exp(a)`` (FKL likewise),
    so the logits are read twice (row maxima, then the sums) and nothing ``[M, V]`` is stored. Returns ``[M, 1]``
    tensors ``(c_x, c_y, fkl, rkl)`` with ``log q = x - c_x``, ``log p = y - c_y`` (a KL not wanted is 0). Each use
    of an exp is written out on its own: the code generator merges them inside a kernel, whereas one shared node
    would be stored as an ``[M, V]`` buffer by inductor's CPU heuristics.
    """
    mx = x.amax(dim=-1, keepdim=True)
    my = y.amax(dim=-1, keepdim=True)
    ax = x - mx
    ay = y - my
    zx = torch.exp(ax).sum(dim=-1, keepdim=True)
    zy = torch.exp(ay).sum(dim=-1, keepdim=True)
    # an entry without mass on the weighting side adds 0 (0 * inf would be NaN); a NaN input stays NaN
    lzx = torch.log(zx)
    lzy = torch.log(zy)
    fkl = rkl = torch.zeros_like(zx)
    if want_rkl:
        rx = torch.where(torch.exp(ax) == 0, 0.0, torch.exp(ax) * (ax - ay)).sum(dim=-1, keepdim=True)
        rkl = rx / zx - lzx + lzy
    if want_fkl:
        ry = torch.where(torch.exp(ay) == 0, 0.0, torch.exp(ay) * (ay - ax)).sum(dim=-1, keepdim=True)
        fkl = ry / zy - lzy + lzx
    return mx + lzx, my + lzy, fkl, rkl


def _mix(a: torch.Tensor, fkl: torch.Tensor, rkl: torch.Tensor) -> torch.Tensor:
    """``a * fkl + (1 - a) * rkl``; a zero weight drops its divergence even where it is infinite."""
    return torch.where(a == 0, 0.0, a * fkl) + torch.where(a == 1, 0.0, (1.0 - a) * rkl)


def _student_grad(lq, lp, a, rkl, use_f: bool, use_r: bool):
    """``d loss / d z_q * T = alpha (q - p) + (1 - alpha) q (log q - log p - RKL)``, only the used terms."""
    g = None
    if use_f:
        g = a * (torch.exp(lq) - torch.exp(lp))
    if use_r:
        r = torch.where((a == 1) | (torch.exp(lq) == 0), 0.0, (1.0 - a) * torch.exp(lq) * (lq - lp - rkl))
        g = r if g is None else g + r
    return torch.zeros_like(lq) if g is None else g


def _teacher_grad(lq, lp, a, fkl, use_f: bool, use_r: bool):
    """``d loss / d z_p * T = alpha p (log p - log q - FKL) + (1 - alpha) (p - q)``, only the used terms."""
    g = None
    if use_f:
        g = torch.where((a == 0) | (torch.exp(lp) == 0), 0.0, a * torch.exp(lp) * (lp - lq - fkl))
    if use_r:
        r = (1.0 - a) * (torch.exp(lp) - torch.exp(lq))
        g = r if g is None else g + r
    return torch.zeros_like(lp) if g is None else g


def _write(out: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> None:
    if index is not None:
        out.index_put_((index,), values.to(out.dtype))
    else:
        out.copy_(values)


def _make_forward_kernel(compute: torch.dtype, temperature: float, indexed: bool):
    """``kernel(s, t, index, alpha [M]) -> (loss, fkl, rkl, c_s, c_t) [M]``: values and the row statistics that the
    backward kernel needs. With ``indexed`` the rows are ``s[index]``, ``t[index]`` (``index [M]``: read in place,
    never gathered into a copy); otherwise every row of ``s`` and ``t`` ``[M, V]``."""
    inv_t = 1.0 / temperature

    def forward_kernel(s, t, index, alpha):
        x = (s[index] if indexed else s).to(compute)
        y = (t[index] if indexed else t).to(compute)
        if inv_t != 1.0:
            x, y = x * inv_t, y * inv_t
        cx, cy, fkl, rkl = _row_stats(x, y)
        a = alpha.to(compute).unsqueeze(-1)
        return tuple(v.squeeze(-1) for v in (_mix(a, fkl, rkl), fkl, rkl, cx, cy))

    return forward_kernel


def _make_backward_kernel(
    compute: torch.dtype, temperature: float, need_s: bool, need_t: bool, use_f: bool, use_r: bool, indexed: bool
):
    """``kernel(s, t, index, alpha, c_s, c_t, fkl, rkl, scale [M], out_s, out_t)``: the gradients, scaled per row by
    ``scale`` (the incoming gradient of each token's loss), written into ``out_s`` / ``out_t`` (rows ``index``
    with ``indexed``). One read of the logits and one write of each gradient."""
    inv_t = 1.0 / temperature

    def backward_kernel(s, t, index, alpha, cx, cy, fkl, rkl, scale, out_s, out_t):
        x = (s[index] if indexed else s).to(compute)
        y = (t[index] if indexed else t).to(compute)
        if inv_t != 1.0:
            x, y = x * inv_t, y * inv_t
        lq = x - cx.unsqueeze(-1)
        lp = y - cy.unsqueeze(-1)
        a = alpha.to(compute).unsqueeze(-1)
        w = (scale.to(compute) * inv_t).unsqueeze(-1)
        if need_s:
            _write(out_s, index if indexed else None, _student_grad(lq, lp, a, rkl.unsqueeze(-1), use_f, use_r) * w)
        if need_t:
            _write(out_t, index if indexed else None, _teacher_grad(lq, lp, a, fkl.unsqueeze(-1), use_f, use_r) * w)

    return backward_kernel


def _make_fused_kernel(compute: torch.dtype, temperature: float, need_s: bool, use_f: bool, use_r: bool):
    """``kernel(s, t, alpha [M], out_s) -> (loss, fkl, rkl) [M]``: the loss and the (unscaled) student gradient of
    ``[M, V]`` logits in one call, for the fused-linear path (whose logits exist one chunk at a time); with
    ``use_f`` / ``use_r`` False the FKL / RKL is neither computed nor returned (0)."""
    inv_t = 1.0 / temperature

    def fused_kernel(s, t, alpha, out_s):
        x, y = s.to(compute), t.to(compute)
        if inv_t != 1.0:
            x, y = x * inv_t, y * inv_t
        # only the loss is returned: a divergence whose weight is 0 on every row is not computed at all
        cx, cy, fkl, rkl = _row_stats(x, y, use_f, use_r)
        a = alpha.to(compute).unsqueeze(-1)
        if need_s:
            g = _student_grad(x - cx, y - cy, a, rkl, use_f, use_r)
            out_s.copy_(g * inv_t if inv_t != 1.0 else g)
        return _mix(a, fkl, rkl).squeeze(-1), fkl.squeeze(-1), rkl.squeeze(-1)

    return fused_kernel


class _Kernel:
    """One compiled kernel whose row count (dimension 0 of every argument) is dynamic: one compilation serves every
    number of tokens. It has a private copy of the code object, so its compilation cache and recompile limit are its
    own."""

    def __init__(self, fn) -> None:
        private = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, None, fn.__closure__)
        self.compiled = torch.compile(private, fullgraph=True)
        self.compiled_ok = False
        self.compile_seconds = 0.0

    def __call__(self, *args):
        # detached views: whether the caller's logits require grad must not make a second graph (guards)
        args = tuple(None if arg is None else arg.detach() for arg in args)
        for arg in args:  # rows (and the index) are dynamic: no recompilation for another token count
            if arg is not None:
                torch._dynamo.mark_dynamic(arg, 0)
        if self.compiled_ok:
            return self.compiled(*args)
        start = time.perf_counter()
        try:
            # AOTAutograd's graph CSE would merge the per-use exp nodes back into one (see _row_stats)
            with _functorch_config_patch(cse=False):
                out = self.compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[0] if lines else ''}"
            _COMPILE_FAILED.append(reason)
            warnings.warn(
                f"arkd.losses: torch.compile of the bidirectional KL kernel failed ({reason}); using the eager "
                f"chunked path from now on (set {COMPILE_ENV}=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=4,
            )
            raise _CompileFailed(reason) from error
        self.compile_seconds = time.perf_counter() - start
        self.compiled_ok = True
        return out


def _functorch_config_patch(**changes):
    try:
        import torch._functorch.config as functorch_config
    except ImportError:  # pragma: no cover - very old torch
        return contextlib.nullcontext()
    return functorch_config.patch(**{k: v for k, v in changes.items() if hasattr(functorch_config, k)})


def _kernel(key: tuple, make, *flags) -> _Kernel:
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = _Kernel(make(*flags))
    return kernel


def _alpha_modes(alpha: torch.Tensor, mask: torch.Tensor | None) -> tuple[bool, bool]:
    """``(use_fkl_gradient, use_rkl_gradient)``: False where alpha is exactly 1 (resp. 0) on every counted token."""
    counted = alpha if mask is None else alpha[mask]
    if counted.numel() == 0:
        return False, False
    low, high = torch.aminmax(counted.double())
    low, high = float(low), float(high)
    return not high == 0.0, not low == 1.0  # NaN keeps both


class _RowLayout:
    """Rows of ``[..., V]`` logits as rows of one ``[R, V]`` strided view of their storage (no copy).

    ``logits[:, :-1]`` of a contiguous ``[B, T, V]`` is rows ``b * T + t`` (``t < T - 1``) of the ``[B * T, V]``
    matrix. ``rows`` maps the tokens (flattened) to rows of ``base``, or is None for the identity; rows that are no
    token are never read. :meth:`of` returns None when no such view exists (overlapping rows, or rows spread over
    more than twice the tokens): the eager path gathers rows instead.
    """

    def __init__(self, base: torch.Tensor, rows: torch.Tensor | None, row_strides: tuple[int, ...]) -> None:
        self.base, self.rows, self.row_strides = base, rows, row_strides

    @classmethod
    def of(cls, x: torch.Tensor) -> _RowLayout | None:
        v = x.shape[-1]
        if x.dim() < 2 or (x.stride(-1) != 1 and v > 1):
            return None
        try:
            flat = x.view(-1, v)
        except RuntimeError:
            flat = None
        if flat is not None and (flat.shape[0] <= 1 or flat.stride(0) >= v):
            return cls(flat, None, ())
        shape, strides = x.shape[:-1], x.stride()[:-1]
        used = [st for size, st in zip(shape, strides) if size > 1]
        unit = min(used)
        if unit < v or any(st % unit for st in used):
            return None
        row_strides = tuple(st // unit if size > 1 else 0 for size, st in zip(shape, strides))
        rows = torch.zeros((), dtype=torch.long, device=x.device)
        for dim, (size, step) in enumerate(zip(shape, row_strides)):
            view = [1] * len(shape)
            view[dim] = size
            rows = rows + torch.arange(size, device=x.device).mul_(step).view(view)
        rows = rows.reshape(-1)
        n = rows.numel()
        total = int(rows.max()) + 1
        if total > 2 * n or torch.unique(rows).numel() != n:
            return None
        return cls(x.as_strided((total, v), (unit, 1), x.storage_offset()), rows, row_strides)

    def same_rows(self, other: _RowLayout) -> bool:
        if self.rows is None or other.rows is None:
            return self.rows is None and other.rows is None
        return self.row_strides == other.row_strides and self.base.shape[0] == other.base.shape[0]

    def grad_view(self, grad_rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The ``[R, V]`` (contiguous) gradient rows as a tensor shaped like the logits."""
        if self.rows is None:
            return grad_rows.view(like.shape)
        v = like.shape[-1]
        return grad_rows.as_strided(like.shape, tuple(st * v for st in self.row_strides) + (1,))


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
    v = student.shape[-1]
    n = student.shape[:-1].numel()
    dtype = compute_dtype(student.dtype)
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


def _check_compiled(compiled) -> None:
    if compiled is not None and not isinstance(compiled, bool):
        raise ValueError(f"compiled must be True, False or None (auto), got {compiled!r}")


def _fused_linear_forward(
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
    need_h,
    need_w,
    need_b,
    compiled,
):
    """``(total, grad_hidden, grad_weight, grad_bias)`` of the fused-linear loss, chunk by chunk of counted rows.

    Each chunk's math runs through :func:`_chunk_bidirectional` (eager) or the compiled kernel (its row count is
    dynamic: one compilation serves every chunk, the last and shorter one included). The student-logits,
    teacher-logits and logits-gradient buffers are allocated once per call and reused by every chunk.
    """
    dtype = compute_dtype(hidden.dtype)
    device = hidden.device
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
    need_grad = need_h or need_w or need_b
    total = torch.zeros((), dtype=dtype, device=device)
    w_c = weight.to(dtype)
    b_c = None if bias is None else bias.to(dtype)
    v = w_c.shape[0]
    workspace, logits_buffer, teacher_buffer, grad_buffer = _Workspace(4), _Workspace(1), _Workspace(1), _Workspace(1)
    t_dtype = teacher_logits.dtype if teacher_logits is not None else teacher_weight.dtype
    kernel = None
    if compiled:
        use_f, use_r = _alpha_modes(alpha, mask)
        t_stride = v if teacher_logits is None or mask is not None else teacher_logits.stride(0)
        key = ("fused", device.type, device.index, v, dtype, t_dtype, t_stride, float(temperature), need_grad)
        key += (use_f, use_r)
        kernel = _kernel(key, _make_fused_kernel, dtype, float(temperature), need_grad, use_f, use_r)
    for rows, index in _row_chunks(mask, hidden.shape[0], chunk_size):
        h = hidden[rows].to(dtype)
        c = h.shape[0]
        (logits,) = logits_buffer.get(c, v, dtype, device)
        if b_c is None:
            torch.mm(h, w_c.t(), out=logits)
        else:
            torch.addmm(b_c, h, w_c.t(), out=logits)
        if teacher_logits is not None:
            t_logits = teacher_logits[rows]
        else:  # into one reused buffer
            (t_logits,) = teacher_buffer.get(c, v, t_dtype, device)
            if teacher_bias is None:
                torch.mm(teacher_hidden[rows], teacher_weight.t(), out=t_logits)
            else:
                torch.addmm(teacher_bias, teacher_hidden[rows], teacher_weight.t(), out=t_logits)
        if kernel is None or c == 1:  # a single row: the kernel's row count is dynamic from 2 on
            loss, _, _, grad_logits, _ = _chunk_bidirectional(
                logits, t_logits, alpha[rows], temperature, need_grad, False, workspace
            )
        else:
            grad_logits = grad_buffer.get(c, v, dtype, device)[0] if need_grad else None
            loss, _, _ = kernel(logits, t_logits, alpha[rows].contiguous(), grad_logits)
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
    return total, grad_h, grad_w, grad_b


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
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        args = (hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, alpha)
        args += (token_weight, mask, temperature, chunk_size, need_h, need_w, need_b)
        out = None
        if compiled:
            try:
                out = _fused_linear_forward(*args, compiled=True)
            except _CompileFailed:
                out = None
        if out is None:
            out = _fused_linear_forward(*args, compiled=False)
        total, grad_h, grad_w, grad_b = out
        ctx.save_for_backward(
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        if bool(grad_total == 1):  # loss.backward() itself: the saved gradients as they are, no pass over them
            grads = list(ctx.saved_tensors)
        else:
            grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
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
        compile_enabled(compiled, n * v, student_hidden.device),
    )
    return total
