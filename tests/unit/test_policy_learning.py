"""LearnedPolicy: credit assignment, the REINFORCE gradient, checkpoints, and evidence that it learns."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from arkd.policy import LearnedPolicy, StepContext, compute_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_ctx(
    b: int = 3,
    t: int = 5,
    v: int = 9,
    seed: int = 0,
    progress: float = 0.0,
    empty_row: int | None = None,
    step: int = 0,
    candidates: int = 0,
) -> StepContext:
    g = torch.Generator().manual_seed(seed)
    s, te = 2 * torch.randn(b, t, v, generator=g), 2 * torch.randn(b, t, v, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False
    if empty_row is not None:
        mask[empty_row] = False
    return StepContext(features=compute_features(s, te, mask), progress=progress, step=step, candidates=candidates)


@pytest.mark.parametrize("granularity,shape", [("batch", ()), ("sequence", (3,)), ("token", (3, 5))])
def test_select_shapes_candidates_and_logs(granularity, shape):
    pol = LearnedPolicy(granularity=granularity, seed=1)
    ctx = make_ctx(candidates=3)
    alpha = pol.select(ctx)
    assert alpha.shape == shape and torch.all((alpha > 0) & (alpha < 1))
    cands = pol.candidate_actions()
    assert len(cands) == 3 and all(c.shape == shape for c in cands)
    stats = pol.update(torch.tensor([0.3, -0.1, 0.2]))
    log = pol.last_log()
    for key in ("policy_entropy", "policy_concentration", "policy_mean", "reward", "policy_loss", "advantage_std"):
        assert math.isfinite(log[key]), key
    assert stats["reward"] == pytest.approx(0.4 / 3)
    # a step without a reward: the mean is played and nothing waits for a reward
    assert pol.select(make_ctx(step=1)).shape == shape and pol.candidate_actions() == []
    with pytest.raises(RuntimeError, match="no pending action"):
        pol.update(torch.tensor([0.0, 0.0]))


def test_apply_mean_plays_the_mean_and_sample_plays_candidate_zero():
    mean_pol = LearnedPolicy(granularity="batch", init_alpha=0.3, init_concentration=8.0, seed=0)
    alpha = mean_pol.select(make_ctx(candidates=2))
    assert float(alpha) == pytest.approx(0.3, abs=0.02)  # the head starts near its initial output
    assert all(abs(float(c) - float(alpha)) > 1e-6 for c in mean_pol.candidate_actions())
    sample_pol = LearnedPolicy(granularity="batch", apply="sample", seed=0)
    alpha = sample_pol.select(make_ctx(candidates=2))
    assert float(alpha) == float(sample_pol.candidate_actions()[0])


def test_paired_gradient_is_leave_one_out_reinforce():
    """update(r) with K candidates = -mean_k A_k grad log pi(a_k | x), A_k = (r_k - mean_{j!=k} r_j) / scale."""
    pol = LearnedPolicy(granularity="batch", entropy_coef=0.0, max_grad_norm=None, seed=3, lr=0.0)
    ctx = make_ctx(candidates=4)
    pol.select(ctx)
    x = pol._pending[0].inputs.clone()
    actions = pol._pending[0].candidates[:, 0].clone()
    r = torch.tensor([0.3, -0.2, 0.05, 0.4], dtype=torch.float64)
    pol.update(r)
    got = [p.grad.clone() for p in pol.network.parameters()]
    adv = r - (r.sum() - r) / 3
    adv = adv / math.sqrt(float((adv**2).mean()) + 1e-12)
    ref = LearnedPolicy(granularity="batch", seed=3)
    ref.network.load_state_dict(pol.network.state_dict())
    dist = ref.network(x.repeat(4, 1))
    (-(adv.float() * dist.log_prob(actions)).mean()).backward()
    for a, b in zip(got, [p.grad for p in ref.network.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_self_credit_gradient_pairs_every_token_with_its_own_reward():
    """Legacy credit (K = 1): each token's action with its own reward, centred within the update."""
    pol = LearnedPolicy(granularity="token", entropy_coef=0.0, max_grad_norm=None, seed=3, lr=0.0)
    ctx = make_ctx(candidates=1)
    alpha = pol.select(ctx)
    mask = ctx.features.mask
    reward = torch.sin(7 * alpha)  # a reward that depends on each action's own value
    x = pol._pending[0].inputs.clone()
    pol.update(reward)
    got = [p.grad.clone() for p in pol.network.parameters()]
    r = reward[mask].double()
    adv = r - r.mean()
    adv = (adv / math.sqrt(float((adv**2).mean()) + 1e-12)).float()
    ref = LearnedPolicy(granularity="token", seed=3)
    ref.network.load_state_dict(pol.network.state_dict())
    (-(adv * ref.network(x).log_prob(alpha[mask])).mean()).backward()
    for a, b in zip(got, [p.grad for p in ref.network.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # a mis-paired reward (shifted by one token) gives a different gradient
    pol.select(ctx)
    pol.update(torch.roll(reward, 1, dims=1))
    assert any(not torch.allclose(a, p.grad) for a, p in zip(got, pol.network.parameters()))


def test_stale_pending_actions_are_dropped_and_shapes_checked():
    pol = LearnedPolicy(granularity="sequence", seed=0)
    pol.select(make_ctx(candidates=2, step=0))
    pol.select(make_ctx(candidates=2, step=1))  # step 0's reward never came (a skipped step): not credited
    assert len(pol._pending) == 1
    with pytest.raises(ValueError, match="2 candidates were sampled, got 3 rewards"):
        pol.update(torch.zeros(3))
    pol.select(make_ctx(candidates=1, step=2))
    with pytest.raises(ValueError, match="needs a reward of shape"):
        pol.update(torch.zeros(5))


def test_uncounted_positions_are_neither_acted_on_nor_credited():
    for granularity in ("sequence", "token"):
        pol = LearnedPolicy(granularity=granularity, seed=0)
        alpha = pol.select(make_ctx(empty_row=1, candidates=1))
        assert torch.all(alpha[1] == 0.5)
        reward = torch.zeros(alpha.shape)
        reward[1] = math.nan  # ignored: nothing was counted there
        pol.update(reward)


@pytest.mark.parametrize("ppo_clip", [None, 0.2])
def test_state_dict_round_trip_continues_identically(ppo_clip):
    a = LearnedPolicy(granularity="sequence", seed=0, ppo_clip=ppo_clip, buffer_size=3, ppo_epochs=2)
    for step in range(4):
        a.select(make_ctx(seed=step, step=step, candidates=2))
        a.update(torch.tensor([0.1 * step, -0.05]))
    b = LearnedPolicy(granularity="sequence", seed=99, ppo_clip=ppo_clip, buffer_size=3, ppo_epochs=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as through a file: Adam's load_state_dict shares tensors
    for step in range(4, 8):
        ctx = make_ctx(seed=step, step=step, candidates=2)
        torch.testing.assert_close(a.select(ctx), b.select(ctx))
        for x, y in zip(a.candidate_actions(), b.candidate_actions()):
            torch.testing.assert_close(x, y)
        a.update(torch.tensor([0.2, 0.1]))
        b.update(torch.tensor([0.2, 0.1]))
    for x, y in zip(a.network.parameters(), b.network.parameters()):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="granularity"):
        LearnedPolicy(granularity="token").load_state_dict(a.state_dict())


def test_constructor_validation():
    with pytest.raises(ValueError, match="granularity"):
        LearnedPolicy(granularity="document")
    with pytest.raises(ValueError, match="apply"):
        LearnedPolicy(apply="max")
    with pytest.raises(ValueError, match="ppo_clip"):
        LearnedPolicy(ppo_clip=0.0)
    with pytest.raises(ValueError, match="init_concentration"):
        LearnedPolicy(init_alpha=0.1, init_concentration=4.0)
    with pytest.raises(ValueError, match="lr"):
        LearnedPolicy(lr=-1.0)


def _two_kinds(kind: int, seed: int) -> StepContext:
    """Two kinds of state: a student far from the teacher (kind 0) and one close to it (kind 1)."""
    g = torch.Generator().manual_seed(seed)
    t = 2 * torch.randn(2, 4, 6, generator=g)
    s = t + (3.0 if kind == 0 else 0.1) * torch.randn(2, 4, 6, generator=g)
    return StepContext(features=compute_features(s, t), step=seed, candidates=2)


@pytest.mark.parametrize("seed", [0, 1])
def test_contextual_bandit_learns_a_state_dependent_alpha(seed):
    """alpha* = 0.2 in one kind of state and 0.8 in the other, a noisy reward, paired credit (RLOO over 2
    candidates): the policy's mean alpha per kind ends within 0.1 of alpha*."""
    pol = LearnedPolicy(granularity="batch", seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    best = {0: 0.2, 1: 0.8}
    for step in range(600):
        kind = step % 2
        pol.select(_two_kinds(kind, step))
        cands = torch.stack(pol.candidate_actions())
        r = -((cands - best[kind]) ** 2) + 0.02 * torch.randn(cands.shape, generator=g)
        pol.update(r)
    for kind in (0, 1):
        means = [float(pol.select(StepContext(features=_two_kinds(kind, 10_000 + i).features))) for i in range(10)]
        assert abs(sum(means) / 10 - best[kind]) < 0.1, (kind, means)


def test_bandit_ppo_finds_alpha_star_under_noise():
    pol = LearnedPolicy(granularity="batch", ppo_clip=0.2, buffer_size=8, ppo_epochs=4, seed=0)
    ctx = make_ctx(b=2, t=4)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        pol.select(make_ctx(b=2, t=4, step=step, candidates=2))
        cands = torch.stack(pol.candidate_actions())
        pol.update(-((cands - 0.2) ** 2) + 0.01 * torch.randn(cands.shape, generator=g))
    assert abs(float(pol.select(ctx)) - 0.2) < 0.05


def test_token_policy_learns_a_feature_dependent_alpha():
    """Tokens whose teacher is confident want alpha 0.8, the others 0.2 (legacy per-token self-credit): only a
    correct pairing of each token's action with its own reward can learn this."""
    pol = LearnedPolicy(granularity="token", hidden_size=32, apply="sample", seed=0)
    for step in range(150):
        ctx = make_ctx(b=4, t=8, v=6, seed=step, step=step, candidates=1)
        confident = ctx.features.teacher_confidence > 0.5
        target = torch.where(confident, 0.8, 0.2)
        alpha = pol.select(ctx)
        pol.update(-((alpha - target) ** 2))
    pol.apply = "mean"
    ctx = make_ctx(b=16, t=8, v=6, seed=10_000, step=10_000)
    alpha = pol.select(ctx)
    confident = (ctx.features.teacher_confidence > 0.5) & ctx.features.mask
    others = ~confident & ctx.features.mask
    assert float(alpha[confident].mean()) > 0.65
    assert float(alpha[others].mean()) < 0.35


@pytest.mark.gpu
def test_features_and_strategies_on_cuda():
    """Features stay on the logits' device, the policy on the CPU, and alpha comes back on the logits' device."""
    from arkd.policy import AKLHeuristic, ConstantAlpha, EntropyGated, ToDiHeuristic

    g = torch.Generator().manual_seed(0)
    s, t = 2 * torch.randn(3, 5, 11, generator=g), 2 * torch.randn(3, 5, 11, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    cpu = compute_features(s, t, mask)
    gpu = compute_features(s.cuda().bfloat16(), t.cuda().bfloat16(), mask.cuda())
    ref = compute_features(s.bfloat16().float(), t.bfloat16().float(), mask)
    assert gpu.fkl.device.type == "cuda"
    torch.testing.assert_close(gpu.batch().cpu(), ref.batch(), rtol=1e-4, atol=1e-5)
    assert cpu.fkl_mean > 0
    for strategy in (ConstantAlpha(alpha=0.5), AKLHeuristic(), ToDiHeuristic(), EntropyGated()):
        assert strategy.select(StepContext(features=gpu)).device.type == "cuda"
    for granularity in ("batch", "sequence", "token"):
        pol = LearnedPolicy(granularity=granularity)
        alpha = pol.select(StepContext(features=gpu, candidates=2))
        assert alpha.device.type == "cuda" and all(c.device.type == "cuda" for c in pol.candidate_actions())
        pol.update(torch.tensor([0.1, -0.1]))
