"""The fast generalized JSD (arkd/losses/fused_jsd.py) against the naive formula, TRL's generalized_jsd_loss and
gradcheck; -inf / NaN semantics as the bidirectional fast path's."""

from __future__ import annotations

import math

import pytest
import torch

import arkd.losses as L
from arkd.losses.fused_jsd import GeneralizedJSDFunction

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def naive_jsd(s, t, mask, beta, temperature, reduction):
    """The textbook formula with plain autograd: m = beta p + (1 - beta) q, beta KL(p||m) + (1 - beta) KL(q||m)."""
    log_q = torch.log_softmax(s.double() / temperature, -1)
    log_p = torch.log_softmax(t.double() / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        values = (p * (log_p - log_q)).sum(-1)
    elif beta == 1:
        values = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        values = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    if mask is not None:
        values = torch.where(mask, values, torch.zeros_like(values))
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / (mask.sum() if mask is not None else values.numel())


def _case(seed=0, b=3, t=9, v=37, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t + 1, v, generator=g, dtype=dtype) * 3
    te = torch.randn(b, t + 1, v, generator=g, dtype=dtype) * 3
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    return s, te, mask


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_values_and_gradients_equal_the_naive_formula(beta, reduction, temperature, chunk_size):
    s, t, mask = _case()
    x = s.clone().requires_grad_()  # the shifted, non-viewable layout logits[:, :-1], as a trainer passes it
    got = L.fused_generalized_jsd(x[:, :-1], t[:, :-1], mask, beta=beta, temperature=temperature,
                                  reduction=reduction, chunk_size=chunk_size)  # fmt: skip
    y = s[:, :-1].clone().requires_grad_()
    ref = naive_jsd(y, t[:, :-1], mask, beta, temperature, reduction)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    weights = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    (gx,) = torch.autograd.grad((got * weights).sum(), x)
    (gy,) = torch.autograd.grad((ref * weights).sum(), y)
    torch.testing.assert_close(gx[:, :-1], gy, rtol=1e-9, atol=1e-12)
    assert (gx[:, -1] == 0).all()  # the last position is not an input of the loss
    assert (gx[:, :-1][~mask] == 0).all()  # uncounted tokens: gradient 0


@pytest.mark.parametrize("beta", BETAS)
def test_equals_the_reference_module_and_functional(beta):
    s, t, mask = _case(seed=2, dtype=torch.float32)
    fast = L.GeneralizedJSDLoss(beta=beta, reduction="sum")
    slow = L.GeneralizedJSDLoss(beta=beta, reduction="sum", fused=False)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    va, vb = fast(a, t, None), slow(b, t, None)
    torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(vb, L.generalized_jsd(s, t, beta=beta, reduction="sum"))
    va.backward()
    vb.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_equals_trl_generalized_jsd_loss(beta, with_mask):
    gkd = pytest.importorskip("trl.experimental.gkd")
    s, t, mask = _case(seed=3)
    labels = torch.randint(0, s.shape[-1], mask.shape, generator=torch.Generator().manual_seed(4))
    if with_mask:
        labels[~mask] = -100
    x, y = s[:, :-1].clone().requires_grad_(), s[:, :-1].clone().requires_grad_()
    ref = gkd.GKDTrainer.generalized_jsd_loss(x, t[:, :-1], labels=labels, beta=beta)  # batchmean over labels
    got = L.fused_generalized_jsd(y, t[:, :-1], labels != -100, beta=beta, reduction="mean")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    (gx,) = torch.autograd.grad(ref, x)
    (gy,) = torch.autograd.grad(got, y)
    torch.testing.assert_close(gy, gx, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.3, 0.5])
def test_gradcheck_float64_student_and_teacher(beta):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True, True, False])
    fn = lambda a, b: GeneralizedJSDFunction.apply(a, b, mask, beta, 1.7, 2, False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))
    # the public function (in-place backward) gives the same teacher gradient as the naive formula
    a, b = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    L.fused_generalized_jsd(a, b, mask.view(2, 3), beta=beta, temperature=1.7, reduction="sum").backward()
    c, d = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    naive_jsd(c, d, mask.view(2, 3), beta, 1.7, "sum").backward()
    torch.testing.assert_close(a.grad, c.grad)
    torch.testing.assert_close(b.grad, d.grad)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_neg_inf_entries_are_zero_probability_and_the_divergence_stays_finite(beta):
    s, t, mask = _case(seed=6)
    s, t = s[:, :-1].clone(), t[:, :-1].clone()
    s[..., -4:] = t[..., -4:] = float("-inf")  # shared -inf: contributes nothing
    s[0, 0, 0] = float("-inf")  # the student bans a token the teacher gives mass: finite for 0 < beta < 1
    t[0, 1, 2] = float("-inf")  # and the other way round
    s[1, 2] = float("-inf")  # an uncounted token with no distribution at all must not poison anything
    t[1, 2] = float("-inf")
    mask = mask.clone()
    mask[1, 2] = False
    mask[0, :2] = True
    x = s.clone().requires_grad_()
    got = L.fused_generalized_jsd(x, t, mask, beta=beta, reduction="none")
    assert torch.isfinite(got).all()
    ref = L.generalized_jsd(s, t, mask, beta=beta, reduction="none")  # arkd's reference handles -inf exactly
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    y = s.clone().requires_grad_()
    got.sum().backward()
    L.generalized_jsd(y, t, mask, beta=beta, reduction="sum").backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    # (the autograd reference leaks NaN into the uncounted all -inf token's gradient; the counted ones agree)
    torch.testing.assert_close(x.grad[mask], y.grad[mask], rtol=1e-9, atol=1e-12)
    assert (x.grad[..., -4:] == 0).all() and x.grad[0, 0, 0] == 0
    # the value at the banned entry: q = 0, p > 0 contributes beta p log(1 / beta) to KL(p || m)
    assert math.isfinite(float(got[0, 0].detach()))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_neg_inf_at_the_ends_is_the_bidirectional_paths_infinity(beta):
    s, t, _ = _case(seed=7)
    s = s.clone()
    s[0, 0, 0] = float("-inf")  # FKL is +inf there (beta 0); RKL finite (beta 1)
    got = L.fused_generalized_jsd(s, t, beta=beta, reduction="none")
    assert math.isinf(got[0, 0]) == (beta == 0.0)
    torch.testing.assert_close(got, L.bidirectional_kl(s, t, alpha=1.0 - beta, reduction="none"))


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_nan_logit_gives_nan_loss_and_gradient_like_the_naive_formula(where, reduction):
    s, t, _ = _case(seed=8)
    s, t = s.clone(), t.clone()
    (s if where == "student" else t)[1, 4, 7] = float("nan")
    x = s.clone().requires_grad_()
    got = L.fused_generalized_jsd(x, t, beta=0.5, reduction=reduction)
    ref = naive_jsd(s, t, None, 0.5, 1.0, reduction)
    assert torch.isnan(ref).any()
    if reduction == "none":
        assert torch.isnan(got[1, 4]) and torch.isfinite(got[0]).all()
    else:
        assert torch.isnan(got)
    got.sum().backward()
    assert torch.isnan(x.grad[1, 4]).all() and torch.isfinite(x.grad[0]).all()


def test_nan_in_an_uncounted_token_does_not_leak_and_inf_logit_is_nan():
    s, t, _ = _case(seed=9)
    s = s.clone()
    s[1, 4, 7] = float("nan")
    mask = torch.ones(s.shape[:-1], dtype=torch.bool)
    mask[1, 4] = False
    x = s.clone().requires_grad_()
    got = L.fused_generalized_jsd(x, t, mask, beta=0.5, reduction="sum")
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(x.grad).all() and (x.grad[1, 4] == 0).all()
    s2 = s.clone()
    s2[1, 4, 7] = float("inf")
    assert torch.isnan(naive_jsd(s2, t, None, 0.5, 1.0, "sum"))
    assert torch.isnan(L.fused_generalized_jsd(s2, t, beta=0.5, reduction="sum"))
    s3 = s.clone()
    s3[0, 0] = float("-inf")  # a counted token without a distribution
    assert torch.isnan(L.fused_generalized_jsd(s3, t, beta=0.5, reduction="none")[0, 0])


def test_backward_twice_is_refused_in_one_sentence():
    s, t, _ = _case(seed=10)
    x = s.clone().requires_grad_()
    loss = L.fused_generalized_jsd(x, t, beta=0.5, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_bfloat16_input_gives_a_bfloat16_gradient_close_to_float32():
    s, t, mask = _case(seed=11, dtype=torch.float32)
    x = s.to(torch.bfloat16).requires_grad_()
    got = L.fused_generalized_jsd(x[:, :-1], t.to(torch.bfloat16)[:, :-1], mask, beta=0.5)
    got.backward()
    assert got.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = naive_jsd(s.to(torch.bfloat16).float()[:, :-1], t.to(torch.bfloat16).float()[:, :-1], mask, 0.5, 1.0, "mean")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fused_linear_equals_the_logits_path(beta, reduction, chunk_size):
    g = torch.Generator().manual_seed(12)
    b, t, h, v = 2, 6, 8, 29
    hidden = torch.randn(b, t + 1, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(b, t + 1, v, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(b, t, generator=g) > 0.4
    got = L.fused_linear_generalized_jsd(hidden[:, :-1], weight, teacher[:, :-1], mask, student_bias=bias,
                                         beta=beta, reduction=reduction, chunk_size=chunk_size)  # fmt: skip
    grads = torch.autograd.grad(got * 1.7, [hidden, weight, bias])
    ref = naive_jsd(hidden[:, :-1] @ weight.T + bias, teacher[:, :-1], mask, beta, 1.0, reduction)
    ref_grads = torch.autograd.grad(ref * 1.7, [hidden, weight, bias])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    module = L.GeneralizedJSDLoss(beta=beta, reduction=reduction, chunk_size=chunk_size)
    torch.testing.assert_close(module.from_hidden(hidden[:, :-1], weight, teacher[:, :-1], mask, bias=bias), got)
    assert L.accepts_hidden_states(module)


def test_bad_input_is_refused_in_one_sentence():
    s, t, mask = _case(seed=13)
    with pytest.raises(ValueError, match="beta must be in"):
        L.fused_generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="vocabulary size"):
        L.fused_generalized_jsd(s, t[..., :-1], beta=0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        L.fused_generalized_jsd(s, t, beta=0.5, chunk_size=0)
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match='not "none"'):
        L.fused_linear_generalized_jsd(h, w, torch.randn(2, 3, 7), reduction="none")
    with pytest.raises(ValueError, match="vocabulary size"):
        L.fused_linear_generalized_jsd(h, w, torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="takes no alpha"):
        L.GeneralizedJSDLoss().from_hidden(h, w, torch.randn(2, 3, 7), alpha=0.3)
