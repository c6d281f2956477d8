"""Top-k teacher divergences (arkd.losses.topk) against naive references written here: the coarsened k + 1 category
distributions built with plain probabilities and a membership mask, values and gradients; k = V equal to the
full-vocabulary losses; the KL chain rule for the tail error; bad input in one sentence."""

from __future__ import annotations

import pytest
import torch

import arkd.losses as L
from arkd.losses.topk import TopKTeacher


def _logits(shape=(2, 5, 17), seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return s, t


def _naive_coarse(s, t, k, T=1.0):
    """P and Q over the teacher's top-k tokens plus one bucket, from probabilities and an explicit membership mask."""
    p = torch.softmax(t / T, -1)
    q = torch.softmax(s / T, -1)
    order = torch.argsort(p, dim=-1, descending=True)
    member = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order[..., :k], True)
    p_top = torch.gather(p, -1, order[..., :k])
    q_top = torch.gather(q, -1, order[..., :k])
    p_rest = (p * ~member).sum(-1, keepdim=True)
    q_rest = (q * ~member).sum(-1, keepdim=True)
    return torch.cat([p_top, p_rest], -1), torch.cat([q_top, q_rest], -1)


def _kl(a, b):
    return torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a)).sum(-1)


def _naive(name, s, t, k, T=1.0, alpha=0.5, beta=0.5):
    P, Q = _naive_coarse(s, t, k, T)
    if name == "fkl":
        return _kl(P, Q)
    if name == "rkl":
        return _kl(Q, P)
    if name == "bidirectional":
        return alpha * _kl(P, Q) + (1 - alpha) * _kl(Q, P)
    m = beta * P + (1 - beta) * Q
    return beta * _kl(P, m) + (1 - beta) * _kl(Q, m)


def _ours(name, s, teacher, mask=None, T=1.0, alpha=0.5, beta=0.5, reduction="none"):
    kw = {"temperature": T, "reduction": reduction}
    if name == "fkl":
        return L.forward_kl_topk(s, teacher, mask, **kw)
    if name == "rkl":
        return L.reverse_kl_topk(s, teacher, mask, **kw)
    if name == "bidirectional":
        return L.bidirectional_kl_topk(s, teacher, mask, alpha=alpha, **kw)
    return L.generalized_jsd_topk(s, teacher, mask, beta=beta, **kw)


NAMES = ["fkl", "rkl", "bidirectional", "gjsd"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_values_and_gradients_match_a_naive_coarse_reference(name, k, T):
    s, t = _logits()
    teacher = TopKTeacher.from_logits(t, k, temperature=T)
    ours = _ours(name, s, teacher, T=T, alpha=0.3, beta=0.7)
    ref = _naive(name, s, t, k, T=T, alpha=0.3, beta=0.7)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    w = torch.randn(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (g_ours,) = torch.autograd.grad((ours * w).sum(), s)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), s)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_k_equal_to_the_vocabulary_is_the_full_loss(name):
    s, t = _logits(seed=4)
    v = s.shape[-1]
    teacher = TopKTeacher.from_logits(t, v)
    assert bool((teacher.log_tail == float("-inf")).all())  # nothing left: an empty bucket, not 1 - sum
    full = {
        "fkl": lambda: L.forward_kl(s, t, reduction="none"),
        "rkl": lambda: L.reverse_kl(s, t, reduction="none"),
        "bidirectional": lambda: L.bidirectional_kl(s, t, alpha=0.3, reduction="none"),
        "gjsd": lambda: L.generalized_jsd(s, t, beta=0.7, reduction="none"),
    }[name]()
    ours = _ours(name, s, teacher, alpha=0.3, beta=0.7)
    torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-12)
    (g_full,) = torch.autograd.grad(full.sum(), s)
    (g_ours,) = torch.autograd.grad(ours.sum(), s)
    assert torch.isfinite(g_ours).all()
    torch.testing.assert_close(g_ours, g_full, rtol=1e-9, atol=1e-12)


def test_the_tail_error_is_the_kl_chain_rule_term():
    """KL(p||q) - KL(P||Q) = p_R KL(p|R || q|R) (and the same for RKL with q_R): the top-k value is a lower bound."""
    s, t = _logits(shape=(3, 7, 50), seed=5)
    k = 8
    teacher = TopKTeacher.from_logits(t, k)
    p, q = torch.softmax(t, -1), torch.softmax(s.detach(), -1)
    member = torch.zeros_like(p, dtype=torch.bool).scatter(-1, teacher.indices, True)
    p_r, q_r = (p * ~member).sum(-1), (q * ~member).sum(-1)
    p_in = torch.where(member, 0.0, p) / p_r[..., None]
    q_in = torch.where(member, 0.0, q) / q_r[..., None]
    fkl_gap = L.forward_kl(s, t, reduction="none") - L.forward_kl_topk(s, teacher, reduction="none")
    rkl_gap = L.reverse_kl(s, t, reduction="none") - L.reverse_kl_topk(s, teacher, reduction="none")
    torch.testing.assert_close(fkl_gap.detach(), p_r * _kl(p_in, q_in), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(rkl_gap.detach(), q_r * _kl(q_in, p_in), rtol=1e-8, atol=1e-12)
    jsd_gap = L.generalized_jsd(s, t, reduction="none") - L.generalized_jsd_topk(s, teacher, reduction="none")
    assert bool((fkl_gap >= -1e-12).all() and (rkl_gap >= -1e-12).all() and (jsd_gap >= -1e-12).all())


def test_mask_reductions_and_alpha_per_sequence():
    s, t = _logits(seed=6)
    teacher = TopKTeacher.from_logits(t, 5)
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(1)) < 0.6
    mask[0, 0] = True
    alpha = torch.tensor([0.2, 0.9], dtype=torch.float64)
    per_token = L.bidirectional_kl_topk(s, teacher, mask, alpha=alpha, reduction="none")
    ref = torch.where(
        mask, _naive("fkl", s, t, 5) * alpha[:, None] + _naive("rkl", s, t, 5) * (1 - alpha[:, None]), 0.0
    )
    torch.testing.assert_close(per_token, ref)
    total = L.bidirectional_kl_topk(s, teacher, mask, alpha=alpha, reduction="sum")
    torch.testing.assert_close(total, ref.sum())
    mean = L.bidirectional_kl_topk(s, teacher, mask, alpha=alpha, reduction="mean")
    torch.testing.assert_close(mean, ref.sum() / mask.sum())
    _, fkl, rkl = L.bidirectional_kl_topk(s, teacher, mask, alpha=1.0, reduction="sum", return_components=True)
    torch.testing.assert_close(fkl, L.forward_kl_topk(s, teacher, mask, reduction="sum"))
    torch.testing.assert_close(rkl, L.reverse_kl_topk(s, teacher, mask, reduction="sum"))


def test_modules_dispatch_on_a_top_k_teacher_and_refuse_where_they_cannot():
    s, t = _logits(seed=7)
    teacher = TopKTeacher.from_logits(t, 3)
    torch.testing.assert_close(L.ForwardKLLoss()(s, teacher), L.forward_kl_topk(s, teacher))
    torch.testing.assert_close(L.ReverseKLLoss()(s, teacher), L.reverse_kl_topk(s, teacher))
    torch.testing.assert_close(
        L.BidirectionalKLLoss(alpha=0.2)(s, teacher, alpha=0.6), L.bidirectional_kl_topk(s, teacher, alpha=0.6)
    )
    torch.testing.assert_close(L.GeneralizedJSDLoss(beta=0.3)(s, teacher), L.generalized_jsd_topk(s, teacher, beta=0.3))
    torch.testing.assert_close(L.JSDivergenceLoss()(s, teacher), L.js_divergence_topk(s, teacher))
    for loss in (L.ForwardKLLoss(), L.BidirectionalKLLoss(), L.GeneralizedJSDLoss(), L.JSDivergenceLoss()):
        assert L.accepts_topk_teacher(loss)
    for loss in (L.AdaptiveKLLoss(), L.TotalVariationLoss(), L.SkewForwardKLLoss(), L.TAIDLoss()):
        assert not L.accepts_topk_teacher(loss)
    with pytest.raises(ValueError, match="cannot work from a top-k teacher"):
        L.TotalVariationLoss()(s, teacher)


def test_bad_input_is_one_sentence():
    s, t = _logits(seed=8)
    teacher = TopKTeacher.from_logits(t, 3)
    with pytest.raises(ValueError, match="vocabulary size 16 but the top-k teacher is over a vocabulary of 17"):
        L.forward_kl_topk(s[..., :16], teacher)
    with pytest.raises(ValueError, match="temperature 1.0, the loss asks for 2.0"):
        L.forward_kl_topk(s, teacher, temperature=2.0)
    with pytest.raises(ValueError, match="token shape"):
        L.forward_kl_topk(s[:, :3], teacher)
    with pytest.raises(ValueError, match="k must be an integer in"):
        TopKTeacher.from_logits(t, 18)
    with pytest.raises(ValueError, match=r"alpha must hold values in \[0, 1\]"):
        L.bidirectional_kl_topk(s, teacher, alpha=torch.tensor([0.5, 1.5]))


def test_padded_and_banned_teacher_tokens_give_no_nan():
    """-inf teacher logits outside the top-k (banned tokens): the bucket still holds the other tail tokens; at k
    equal to the number of finite tokens the teacher's bucket is empty and the student's tail mass is what counts."""
    s, t = _logits(seed=9)
    t[..., 10:] = float("-inf")
    teacher = TopKTeacher.from_logits(t, 10)
    assert bool((teacher.log_tail == float("-inf")).all())
    full = {"fkl": L.forward_kl, "rkl": L.reverse_kl, "bidirectional": L.bidirectional_kl, "gjsd": L.generalized_jsd}
    for name in NAMES:
        value = _ours(name, s, teacher, reduction="none")
        assert not torch.isnan(value).any(), name
        # the teacher gives the other tokens no mass: every loss equals the full one (RKL is +inf there, as in full)
        torch.testing.assert_close(value, full[name](s, t, reduction="none"))
    (grad,) = torch.autograd.grad(L.forward_kl_topk(s, teacher, reduction="sum"), s)
    assert torch.isfinite(grad).all()
