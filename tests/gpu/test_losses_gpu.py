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


def test_compiled_kernel_cuda_bf16_matches_reference_and_propagates_nan():
    from arkd.losses import fused

    g = torch.Generator(device="cuda").manual_seed(2)
    s_full = (torch.randn(4, 130, 50257, device="cuda", generator=g) * 2).bfloat16().requires_grad_(True)
    t_full = (torch.randn(4, 130, 50257, device="cuda", generator=g) * 2).bfloat16()
    s, t = s_full[:, :-1], t_full[:, :-1]  # the trainer's layout: read in place, never copied
    mask = torch.rand(4, 129, device="cuda", generator=g) < 0.7
    alpha = torch.rand(4, 1, device="cuda", generator=g)
    got = L.bidirectional_kl(s, t, mask, alpha=alpha, compiled=True)
    assert fused.compiled_kernels(), "the compiled kernel did not run on CUDA"
    s32 = s.detach().float().requires_grad_(True)
    ref = _naive(s32, t, alpha, mask)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    (gs,) = torch.autograd.grad(got, s_full)
    (gr,) = torch.autograd.grad(ref, s32)
    assert gs.dtype == torch.bfloat16
    torch.testing.assert_close(gs[:, :-1].float(), gr, rtol=2e-2, atol=1e-9)
    bad = s.detach().clone()
    bad[1, 3, 7] = float("nan")
    for reduction in ("sum", "mean"):
        assert torch.isnan(L.bidirectional_kl(bad, t, mask | True, alpha=alpha, reduction=reduction, compiled=True))


def test_compiled_loss_in_accelerate_bf16_training_does_not_recompile():
    """A tiny GPT-2 student distilled with accelerate (bf16 autocast) over batches of varying sequence lengths:
    the compiled kernels are built at the first step and never again."""
    import torch._dynamo.utils as dynamo_utils
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    from arkd.losses import fused

    vocab = 50257
    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=2)
    torch.manual_seed(0)
    student, teacher = GPT2LMHeadModel(config), GPT2LMHeadModel(config).eval()
    accelerator = Accelerator(mixed_precision="bf16")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    student, teacher, optimizer = accelerator.prepare(student, teacher, optimizer)
    seen = []
    for length in (48, 33, 61, 48, 40):
        ids = torch.randint(0, vocab, (4, length), device=accelerator.device)
        mask = torch.ones(4, length - 1, dtype=torch.bool, device=accelerator.device)
        mask[:, : length // 3] = False  # a prompt that does not count
        with torch.no_grad():
            t = teacher(input_ids=ids).logits[:, :-1]
        s = student(input_ids=ids).logits[:, :-1]
        loss = L.bidirectional_kl(s, t, mask, alpha=torch.rand(4, device=accelerator.device), compiled=True)
        assert torch.isfinite(loss)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen.append((len(fused.compiled_kernels()), dynamo_utils.counters["stats"]["unique_graphs"]))
    assert seen[0][0] >= 2  # forward and backward kernels exist
    assert all(entry == seen[0] for entry in seen), seen  # nothing compiled after the first step
