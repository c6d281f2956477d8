"""nn.Module wrappers of arkd.losses: same values as the functions, validation, and TAID's schedule."""

from __future__ import annotations

import math

import pytest
import torch

import arkd.losses as L

WRAPPERS = [
    (L.ForwardKLLoss, {}, L.forward_kl, {}),
    (L.ReverseKLLoss, {}, L.reverse_kl, {}),
    (L.BidirectionalKLLoss, {"alpha": 0.3}, L.bidirectional_kl, {"alpha": 0.3}),
    (L.GeneralizedJSDLoss, {"beta": 0.2}, L.generalized_jsd, {"beta": 0.2}),
    (L.JSDivergenceLoss, {}, L.js_divergence, {}),
    (L.TotalVariationLoss, {}, L.total_variation, {}),
    (L.SkewForwardKLLoss, {"skew": 0.2}, L.skew_forward_kl, {"skew": 0.2}),
    (L.SkewReverseKLLoss, {"skew": 0.2}, L.skew_reverse_kl, {"skew": 0.2}),
    (L.AdaptiveKLLoss, {"mu": 0.3}, L.adaptive_kl, {"mu": 0.3}),
    (L.TokenWiseKLLoss, {}, L.token_wise_kl, {}),
    (L.AlphaBetaDivergenceLoss, {"alpha": 0.2, "beta": 0.7}, L.alpha_beta_divergence, {"alpha": 0.2, "beta": 0.7}),
    (L.EntropyGatedKLLoss, {"weight": 2.0}, L.entropy_gated_kl, {"weight": 2.0}),
    (L.TAIDLoss, {"t_start": 0.6}, L.taid_kl, {"t": 0.6}),
]


def _logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, 31, generator=g, requires_grad=True), torch.randn(2, 7, 31, generator=g)


@pytest.mark.parametrize("cls,kwargs,fn,hyper", WRAPPERS, ids=[w[0].__name__ for w in WRAPPERS])
def test_wrapper_equals_function(cls, kwargs, fn, hyper):
    s, t = _logits()
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(1)) < 0.6
    module = cls(**kwargs, temperature=2.0, reduction="sum")
    got = module(s, t, mask)
    ref = fn(s, t, mask, temperature=2.0, reduction="sum", **hyper)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(ref, s)[0])
    assert cls.takes_alpha is (cls is L.BidirectionalKLLoss)
    assert cls.needs_target_ids is False
    assert "temperature=2.0" in repr(module)


def test_bidirectional_wrapper_takes_alpha_per_call():
    s, t = _logits(2)
    module = L.BidirectionalKLLoss(alpha=0.9, reduction="none")
    per_seq = torch.tensor([0.1, 0.6])
    torch.testing.assert_close(module(s, t, alpha=per_seq), L.bidirectional_kl(s, t, alpha=per_seq, reduction="none"))
    torch.testing.assert_close(module(s, t), L.bidirectional_kl(s, t, alpha=0.9, reduction="none"))


def test_drkl_wrapper_needs_target_ids():
    s, t = _logits(3)
    y = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(4))
    module = L.DiversityAwareRKLLoss(gamma=0.8)
    assert module.needs_target_ids and not module.takes_alpha
    torch.testing.assert_close(module(s, t, target_ids=y), L.diversity_aware_rkl(s, t, target_ids=y, gamma=0.8))


def test_fused_linear_wrapper():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 7, 6, generator=g, requires_grad=True)
    weight = torch.randn(31, 6, generator=g, requires_grad=True)
    teacher = torch.randn(2, 7, 31, generator=g)
    module = L.FusedLinearBidirectionalKLLoss(alpha=0.2, temperature=1.5, chunk_size=4)
    assert module.takes_alpha
    torch.testing.assert_close(
        module(hidden, weight, teacher, alpha=0.4),
        L.bidirectional_kl(hidden @ weight.T, teacher, alpha=0.4, temperature=1.5),
    )
    with pytest.raises(ValueError, match="none"):
        L.FusedLinearBidirectionalKLLoss(reduction="none")


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (L.ForwardKLLoss, {"reduction": "batchmean"}, "reduction"),
        (L.ForwardKLLoss, {"temperature": 0}, "temperature"),
        (L.BidirectionalKLLoss, {"alpha": -0.1}, "alpha"),
        (L.BidirectionalKLLoss, {"chunk_size": 0}, "chunk_size"),
        (L.GeneralizedJSDLoss, {"beta": 2.0}, "beta"),
        (L.SkewForwardKLLoss, {"skew": 1.0}, "skew"),
        (L.SkewReverseKLLoss, {"skew": -0.5}, "skew"),
        (L.AdaptiveKLLoss, {"mu": 1.5}, "mu"),
        (L.AlphaBetaDivergenceLoss, {"alpha": float("inf")}, "alpha"),
        (L.AlphaBetaDivergenceLoss, {"beta": "x"}, "beta"),
        (L.EntropyGatedKLLoss, {"weight": -1.0}, "weight"),
        (L.DiversityAwareRKLLoss, {"gamma": -0.5}, "gamma"),
        (L.TAIDLoss, {"t_start": 0.9, "t_end": 0.5}, "t_end"),
        (L.TAIDLoss, {"total_steps": 0}, "total_steps"),
        (L.TAIDLoss, {"momentum": 1.0}, "momentum"),
    ],
)
def test_wrappers_validate_hyper_parameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def _reference_taid_schedule(losses, *, t_start, t_end, total_steps, momentum, step_size, adaptive=True):
    """TAID's reference ``update_t`` written out: the first call only stores the loss; call k > 1 uses the 0-based
    step k - 1 in the linear floor (``global_step / num_train_steps``)."""
    t, m, previous, ts = t_start, 0.0, math.inf, []
    for k, loss in enumerate(losses, start=1):
        if math.isinf(previous):
            previous = loss
            ts.append(t)
            continue
        m = momentum * m + (1 - momentum) * (previous - loss) / (previous + 1e-15)
        target = t_start + (t_end - t_start) * (k - 1) / total_steps
        t = min(t_end, max(target, t + step_size / (1 + math.exp(-m)) * (1 - t))) if adaptive else target
        previous = loss
        ts.append(t)
    return ts


def test_taid_linear_schedule():
    taid = L.TAIDLoss(t_start=0.4, t_end=1.0, total_steps=10, adaptive=False)
    ts = [taid.update(1.0 - 0.01 * i) for i in range(12)]
    # the first update only records the loss; update k then sits on the floor at the 0-based step k - 1
    assert ts == pytest.approx([0.4] + [min(1.0, 0.4 + 0.6 * (k - 1) / 10) for k in range(2, 13)])
    losses = [1.0 - 0.01 * i for i in range(12)]
    options = dict(t_start=0.4, t_end=1.0, total_steps=10, momentum=0.99, step_size=5e-4)
    # (the reference never runs past total_steps; arkd caps the floor at t_end there)
    assert ts[:11] == pytest.approx(_reference_taid_schedule(losses[:11], adaptive=False, **options))
    assert taid.hyper()["t"] == pytest.approx(1.0)


def test_taid_adaptive_schedule_follows_the_reference():
    options = dict(t_start=0.4, t_end=1.0, total_steps=50, momentum=0.9, step_size=0.05)
    losses = [2.0 * 0.97**i + 0.1 * math.sin(i) for i in range(60)]
    taid = L.TAIDLoss(**options)
    assert [taid.update(v) for v in losses] == pytest.approx(_reference_taid_schedule(losses, **options), rel=1e-12)


def test_taid_adaptive_schedule_by_hand():
    taid = L.TAIDLoss(t_start=0.4, t_end=1.0, total_steps=1000, momentum=0.5, step_size=0.2)
    # call 1: the loss is only recorded, t stays at t_start
    assert taid.update(2.0) == pytest.approx(0.4)
    # call 2: delta = (2 - 1) / 2 = 0.5, m = 0.25; floor at step 1 is 0.4006; t = 0.4 + 0.2 * sigmoid(0.25) * 0.6
    expected = 0.4 + 0.2 / (1 + math.exp(-0.25)) * 0.6
    assert taid.update(1.0) == pytest.approx(expected)
    # the schedule is part of the state
    fresh = L.TAIDLoss(t_start=0.4, t_end=1.0, total_steps=1000, momentum=0.5, step_size=0.2)
    fresh.load_state_dict(taid.state_dict())
    assert fresh.update(0.5) == pytest.approx(taid.update(0.5))
    # the loss uses the current t
    s, t = _logits(6)
    torch.testing.assert_close(taid(s, t), L.taid_kl(s, t, t=float(taid.t)))
    with pytest.raises(ValueError, match="finite"):
        taid.update(float("nan"))


def test_every_wrapper_declares_its_capabilities():
    # Declared, not sniffed: each module class states the three KDLoss attributes; exactly one of each kind is True.
    classes = [
        getattr(L, name) for name in L.__all__ if name.endswith("Loss") and name not in ("DivergenceLoss", "KDLoss")
    ]
    logits = [c for c in classes if c is not L.FusedLinearBidirectionalKLLoss]
    caps = {c: L.loss_capabilities(c) for c in logits}
    assert {c for c, k in caps.items() if k.takes_alpha} == {L.BidirectionalKLLoss}
    assert {c for c, k in caps.items() if k.needs_target_ids} == {L.DiversityAwareRKLLoss}
    assert {c for c, k in caps.items() if k.has_schedule} == {L.TAIDLoss}
    assert isinstance(L.ForwardKLLoss(), L.KDLoss) and isinstance(L.TAIDLoss(total_steps=10), L.KDLoss)


def test_an_undeclared_loss_is_named():
    class MyLoss(torch.nn.Module):
        takes_alpha = False

        def forward(self, s, t, mask=None):
            return (s - t).pow(2).sum()

    with pytest.raises(TypeError, match=r"MyLoss does not declare needs_target_ids, has_schedule"):
        L.loss_capabilities(MyLoss())

    class Scheduled(MyLoss):
        needs_target_ids = False
        has_schedule = True

    with pytest.raises(TypeError, match="has_schedule but has no update"):
        L.loss_capabilities(Scheduled())
