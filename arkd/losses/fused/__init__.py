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

The package, in the layout of Liger-Kernel's chunked losses (the plumbing in one place, the math in small files):

* :mod:`._chunks`: the eager chunk math (:func:`._chunks._chunk_bidirectional`), the chunk sizes.
* :mod:`._kernels`: the math of the compiled kernels (per-row statistics, the mix, the gradients, the kernel bodies).
* :mod:`._compiled`: when a call compiles, the compiled kernels and the process's compile state (one object).
* :mod:`._rows`: which rows a chunk reads, without copying the logits.
* :mod:`._function`: the logits path, :class:`BidirectionalKLFunction` and :func:`bidirectional_kl_fast`.
* :mod:`.linear`: the fused-linear path, :class:`FusedLinearBidirectionalKLFunction` and
  :func:`fused_linear_bidirectional_kl`.
"""

from __future__ import annotations

from ._chunks import CPU_CHUNK_ELEMENTS, CUDA_CHUNK_ELEMENTS, default_chunk_size
from ._compiled import COMPILE_ENV, COMPILE_MIN_ELEMENTS, compile_enabled, compiled_kernels
from ._function import BidirectionalKLFunction, bidirectional_kl_fast
from .linear import FusedLinearBidirectionalKLFunction, fused_linear_bidirectional_kl

__all__ = [
    "BidirectionalKLFunction",
    "COMPILE_ENV",
    "COMPILE_MIN_ELEMENTS",
    "CPU_CHUNK_ELEMENTS",
    "CUDA_CHUNK_ELEMENTS",
    "FusedLinearBidirectionalKLFunction",
    "bidirectional_kl_fast",
    "compile_enabled",
    "compiled_kernels",
    "default_chunk_size",
    "fused_linear_bidirectional_kl",
]
