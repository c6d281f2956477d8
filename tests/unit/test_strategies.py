"""The fixed, scheduled, heuristic and greedy alpha strategies, and the PolicyNetwork."""

from __future__ import annotations

import math

import pytest
import torch

from arkd.losses.functional import adaptive_kl, bidirectional_kl, token_wise_kl
from arkd.policy import (
    AKLHeuristic,
    AlphaStrategy,
    ConstantAlpha,
    CosineSchedule,
    EntropyGated,
    GreedySearch,
    LinearSchedule,
    PolicyNetwork,
    StepContext,
    ToDiHeuristic,
    compute_features,
)


def make_ctx(progress: float = 0.0, lookahead=None, mu: float = 0.5, seed: int = 0) -> StepContext:
    g = torch.Generator().manual_seed(seed)
    s, t = 2 * torch.randn(3, 5, 11, generator=g), 2 * torch.randn(3, 5, 11, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return StepContext(features=compute_features(s, t, mask, mu=mu), progress=progress, step=7, lookahead=lookahead)


def test_constant_alpha():
    ctx = make_ctx()
    alpha = ConstantAlpha(alpha=0.3).select(ctx)
    assert alpha.shape == () and float(alpha) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\]"):
        ConstantAlpha(alpha=1.5)


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 1.0, 1.7])
def test_schedules_closed_forms(progress):
    p = min(progress, 1.0)
    lin = LinearSchedule(start=0.9, end=0.1).select(make_ctx(progress))
    assert float(lin) == pytest.approx(0.9 - 0.8 * p)
    cos = CosineSchedule(start=0.9, end=0.1).select(make_ctx(progress))
    assert float(cos) == pytest.approx(0.1 + 0.8 * (1 + math.cos(math.pi * p)) / 2)
    if progress == 0.5:
        assert float(cos) == pytest.approx(0.5)  # the cosine crosses the midpoint at half-way


def test_akl_alpha_reproduces_adaptive_kl():
    ctx = make_ctx(mu=0.4)
    strategy = AKLHeuristic(mu=0.4)
    assert strategy.feature_options == {"mu": 0.4}
    alpha = strategy.select(ctx)
    f = ctx.features
    assert alpha.shape == (3, 5)
    m = f.mask
    torch.testing.assert_close(alpha[m], (f.head_gap / (f.head_gap + f.tail_gap))[m])
    assert torch.all(alpha[~m] == 0.5)  # uncounted positions: both gaps 0
    g = torch.Generator().manual_seed(0)
    s, t = 2 * torch.randn(3, 5, 11, generator=g), 2 * torch.randn(3, 5, 11, generator=g)
    ours = bidirectional_kl(s, t, f.mask, alpha=alpha, reduction="none")
    ref = adaptive_kl(s, t, f.mask, mu=0.4, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mu=0.5"):
        AKLHeuristic(mu=0.4).select(make_ctx(mu=0.5))


def test_todi_alpha_is_teacher_weighted_mean_of_todi_weights():
    ctx = make_ctx()
    alpha = ToDiHeuristic().select(ctx)
    g = torch.Generator().manual_seed(0)
    s, t = 2 * torch.randn(3, 5, 11, generator=g), 2 * torch.randn(3, 5, 11, generator=g)
    p, log_p, log_q = t.softmax(-1), t.log_softmax(-1), s.log_softmax(-1)
    ref = (p * torch.sigmoid(log_p - log_q)).sum(-1)
    mask = ctx.features.mask
    torch.testing.assert_close(alpha[mask], ref[mask])
    assert torch.all((alpha >= 0) & (alpha <= 1))
    # limits shared with the vocabulary-level loss: w -> 1 where q << p everywhere the teacher has mass
    s_far = torch.zeros(1, 1, 4)
    t_far = torch.tensor([[[10.0, -30.0, -30.0, -30.0]]])
    f = compute_features(s_far, t_far)
    assert float(f.todi_alpha) > 0.7
    assert float(token_wise_kl(s_far, t_far)) >= 0


def test_entropy_gated_weights():
    t = torch.tensor([[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
    s = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
    ctx = StepContext(features=compute_features(s, t))
    alpha = EntropyGated().select(ctx)
    # teacher flatter -> FKL weighted 3:1; student flatter -> RKL 3:1; equal -> 1:1
    torch.testing.assert_close(alpha, torch.tensor([[0.75, 0.25, 0.5]]))


def test_greedy_search_picks_the_best_lookahead():
    calls = []

    def lookahead(alpha):
        calls.append(alpha)
        return -((alpha - 0.7) ** 2)

    strategy = GreedySearch(candidates=[0.0, 0.5, 0.75, 1.0])
    alpha = strategy.select(make_ctx(lookahead=lookahead))
    assert float(alpha) == pytest.approx(0.75)
    assert calls == [0.0, 0.5, 0.75, 1.0]
    log = strategy.last_log()
    assert log["greedy_best_reward"] == pytest.approx(-(0.05**2))
    # ties go to the first candidate
    assert float(GreedySearch(candidates=[0.2, 0.8]).select(make_ctx(lookahead=lambda a: 1.0))) == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match="lookahead is None"):
        strategy.select(make_ctx())
    with pytest.raises(ValueError, match="candidate"):
        GreedySearch(candidates=[0.5, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        GreedySearch(candidates=[])


@pytest.mark.parametrize(
    "strategy",
    [ConstantAlpha(alpha=0.5), LinearSchedule(), CosineSchedule(), AKLHeuristic(), ToDiHeuristic(), EntropyGated()],
)
def test_common_interface(strategy: AlphaStrategy):
    ctx = make_ctx(progress=0.3)
    alpha = strategy.select(ctx)
    expected = {"batch": (), "sequence": (3,), "token": (3, 5)}[strategy.granularity]
    assert alpha.shape == expected
    assert torch.all((alpha >= 0) & (alpha <= 1))
    assert not strategy.needs_reward and not strategy.chooses_after_gradient
    assert strategy.candidate_actions() == []
    assert isinstance(strategy.last_log(), dict)  # the trainer logs alpha and the divergences itself
    with pytest.raises(RuntimeError, match="does not learn"):
        strategy.update(torch.tensor(1.0))
    strategy.load_state_dict(strategy.state_dict())


def test_policy_network_initial_distribution_and_gradients():
    net = PolicyNetwork(5, hidden_size=16, init_alpha=0.3, init_concentration=6.0)
    x = torch.randn(10, 5)
    mean, kappa = net.mean_concentration(x)
    torch.testing.assert_close(mean, torch.full((10,), 0.3), atol=0.02, rtol=0)
    torch.testing.assert_close(kappa, torch.full((10,), 6.0), atol=0.2, rtol=0)
    dist = net(x)
    torch.testing.assert_close(dist.mean, mean)
    ref = torch.distributions.Beta(mean * kappa, (1 - mean) * kappa)
    a = torch.full((10,), 0.4)
    torch.testing.assert_close(dist.log_prob(a), ref.log_prob(a))
    dist.log_prob(a).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.head.weight.grad.abs().sum() > 0
    net64 = PolicyNetwork(3, hidden_size=4).double()
    inp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: net64.mean_concentration(z), (inp,))
    with pytest.raises(ValueError, match="init_alpha"):
        PolicyNetwork(3, init_alpha=1.0)
    with pytest.raises(ValueError, match="num_layers"):
        PolicyNetwork(3, num_layers=0)
