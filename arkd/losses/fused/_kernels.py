"""The math of the compiled kernels: per-row statistics, the mix of the two KLs, the analytic gradients, and the kernel
bodies that :mod:`._compiled` hands to ``torch.compile`` (see :mod:`arkd.losses.fused` for the formulas)."""

from __future__ import annotations

import torch


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


def _alpha_modes(alpha: torch.Tensor, mask: torch.Tensor | None) -> tuple[bool, bool]:
    """``(use_fkl_gradient, use_rkl_gradient)``: False where alpha is exactly 1 (resp. 0) on every counted token."""
    counted = alpha if mask is None else alpha[mask]
    if counted.numel() == 0:
        return False, False
    low, high = torch.aminmax(counted.double())
    low, high = float(low), float(high)
    return not high == 0.0, not low == 1.0  # NaN keeps both
