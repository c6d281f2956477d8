"""arkd.losses on CUDA: bf16 inputs, the fast paths against the naive float32 reference, memory of the fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import arkd.losses as L

pytestmark = pytest.mark.gpu


def _naive(s, t, alpha, mask):
    log_q, log_p = TF.log_softmax(s.float(), -1), TF.log_softmax(t.float(), -1)
    fkl = TF.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    rkl = TF.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    return ((alpha * fkl + (1 - alpha) * rkl) * mask).sum() / mask.sum()


def test_bidirectional_bf16_cuda_matches_float32_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(4, 129, 50257, device="cuda", generator=g) * 2).bfloat16().requires_grad_(True)
    t = (torch.randn(4, 129, 50257, device="cuda", generator=g) * 2).bfloat16()
    mask = torch.rand(4, 129, device="cuda", generator=g) < 0.7
    alpha = torch.rand(4, 1, device="cuda", generator=g)
    got = L.bidirectional_kl(s, t, mask, alpha=alpha, chunk_size=100)
    s32 = s.detach().float().requires_grad_(True)
    ref = _naive(s32, t, alpha, mask)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    (gs,) = torch.autograd.grad(got, s)
    (gr,) = torch.autograd.grad(ref, s32)
    assert gs.dtype == torch.bfloat16
    torch.testing.assert_close(gs.float(), gr, rtol=2e-2, atol=1e-9)


def test_fast_path_peak_memory_is_about_one_gradient_buffer():
    n, v = 2048, 50257
    s = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    L.bidirectional_kl(s, t, alpha=0.5, chunk_size=256).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = n * v * 2
    chunk_bytes = 256 * v * 4
    assert extra < grad_bytes + 10 * chunk_bytes  # not several [tokens, V] intermediates


def test_fused_linear_cuda_matches_logits_path():
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(3, 77, 64, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(5003, 64, device="cuda", generator=g) / 8).bfloat16().requires_grad_(True)
    t = torch.randn(3, 77, 5003, device="cuda", generator=g).bfloat16()
    got = L.fused_linear_bidirectional_kl(h, w, t, alpha=0.3, chunk_size=50)
    h32 = h.detach().float().requires_grad_(True)
    w32 = w.detach().float().requires_grad_(True)
    ref = L.bidirectional_kl(h32 @ w32.T, t.float(), alpha=0.3)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)
    gh, gw = torch.autograd.grad(got, (h, w))
    rh, rw = torch.autograd.grad(ref, (h32, w32))
    torch.testing.assert_close(gh.float(), rh, rtol=3e-2, atol=1e-6)
    torch.testing.assert_close(gw.float(), rw, rtol=3e-2, atol=1e-6)
