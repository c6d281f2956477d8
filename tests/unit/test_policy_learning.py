"""LearnedPolicy: credit assignment, the REINFORCE gradient, checkpoints, and evidence that it learns."""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import sys
from pathlib import Path

import pytest
import torch

from arkd.policy import LearnedPolicy, StepContext, compute_features

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_ctx(
    b: int = 3, t: int = 5, v: int = 9, seed: int = 0, progress: float = 0.0, empty_row: int | None = None
) -> StepContext:
    g = torch.Generator().manual_seed(seed)
    s, te = 2 * torch.randn(b, t, v, generator=g), 2 * torch.randn(b, t, v, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False
    if empty_row is not None:
        mask[empty_row] = False
    return StepContext(features=compute_features(s, te, mask), progress=progress)


@pytest.mark.parametrize("granularity,shape", [("batch", ()), ("sequence", (3,)), ("token", (3, 5))])
def test_select_shapes_and_logs(granularity, shape):
    pol = LearnedPolicy(granularity=granularity, seed=1)
    ctx = make_ctx()
    alpha = pol.select(ctx)
    assert alpha.shape == shape
    assert torch.all((alpha > 0) & (alpha < 1))
    stats = pol.update(torch.rand(shape))
    log = pol.last_log()
    for key in ("alpha_mean", "alpha_std", "policy_entropy", "fkl", "rkl", "reward", "policy_loss"):
        assert key in log and math.isfinite(log[key]), key
    assert stats["reward"] == log["reward"]


def test_reinforce_gradient_credits_every_token_with_its_own_reward():
    """The update's gradient equals -mean_i(A_i * grad log pi(a_i | x_i)) with A_i built from a_i's own reward."""
    pol = LearnedPolicy(granularity="token", entropy_coef=0.0, max_grad_norm=None, seed=3)
    ctx = make_ctx()
    alpha = pol.select(ctx)
    mask = ctx.features.mask
    reward = torch.sin(7 * alpha)  # a reward that depends on each action's own value
    inputs = pol._pending.inputs.clone()
    before = copy.deepcopy(pol.network)
    pol.update(reward)

    r = reward[mask].double()
    adv = ((r - r.mean()) / torch.sqrt(((r - r.mean()) ** 2).mean() + 1e-12)).float()  # first update: batch baseline
    dist = before(inputs)
    loss = -(adv * dist.log_prob(alpha[mask])).mean()
    loss.backward()
    for (name, p_ref), p in zip(before.named_parameters(), pol.network.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-7, msg=name)
    # a mis-paired reward (shifted by one token) gives a different gradient
    shifted = torch.roll(adv, 1)
    other = copy.deepcopy(before)
    other.zero_grad()
    (-(shifted * other(inputs).log_prob(alpha[mask])).mean()).backward()
    assert not torch.allclose(other.head.weight.grad, pol.network.head.weight.grad)


def test_pending_action_bookkeeping():
    pol = LearnedPolicy(granularity="sequence", seed=0)
    with pytest.raises(RuntimeError, match="no pending action"):
        pol.update(torch.zeros(3))
    pol.select(make_ctx(b=3))
    pol.select(make_ctx(b=2, seed=1))  # the first action is dropped, never credited
    with pytest.raises(ValueError, match="shape"):
        pol.update(torch.zeros(3))
    pol.select(make_ctx(b=2, seed=1))
    pol.update(torch.zeros(2))
    with pytest.raises(RuntimeError, match="no pending action"):
        pol.update(torch.zeros(2))  # one reward per action
    pol.select(make_ctx(b=2, seed=1))
    with pytest.raises(ValueError, match="NaN"):
        pol.update(torch.tensor([0.0, math.nan]))
    batch = LearnedPolicy(granularity="batch")
    batch.select(make_ctx())
    with pytest.raises(ValueError, match="scalar"):
        batch.update(torch.zeros(3))


def test_uncounted_positions_are_neither_acted_on_nor_credited():
    ctx = make_ctx(b=3, t=4, empty_row=1)  # a sequence without counted tokens
    for granularity in ("sequence", "token"):
        pol = LearnedPolicy(granularity=granularity, seed=0)
        alpha = pol.select(ctx)
        assert torch.all(alpha[1] == 0.5)
        reward = torch.zeros(alpha.shape)
        reward[1] = math.nan  # ignored: nothing was counted there
        pol.update(reward)
    # a batch without any counted token: nothing to learn, and nothing breaks
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    empty = StepContext(features=compute_features(s, t, torch.zeros(2, 3, dtype=torch.bool)))
    for granularity in ("sequence", "token"):
        pol = LearnedPolicy(granularity=granularity, seed=0)
        before = [p.clone() for p in pol.network.parameters()]
        alpha = pol.select(empty)
        assert torch.all(alpha == 0.5)
        pol.update(torch.zeros(alpha.shape))
        for p0, p1 in zip(before, pol.network.parameters()):
            assert torch.isfinite(p1).all()
            torch.testing.assert_close(p0, p1)


def test_deterministic_plays_the_mean_and_records_nothing():
    pol = LearnedPolicy(granularity="token", init_alpha=0.3, init_concentration=8.0, deterministic=True)
    ctx = make_ctx()
    alpha = pol.select(ctx)
    torch.testing.assert_close(
        alpha[ctx.features.mask], torch.full_like(alpha[ctx.features.mask], 0.3), atol=0.02, rtol=0
    )
    with pytest.raises(RuntimeError, match="no pending action"):
        pol.update(torch.zeros(3, 5))


@pytest.mark.parametrize("ppo_clip", [None, 0.2])
def test_state_dict_round_trip_continues_identically(ppo_clip):
    a = LearnedPolicy(granularity="sequence", seed=0, ppo_clip=ppo_clip, buffer_size=3, ppo_epochs=2)
    for step in range(4):
        alpha = a.select(make_ctx(seed=step, progress=step / 10))
        a.update(-((alpha - 0.3) ** 2))
    b = LearnedPolicy(granularity="sequence", seed=99, ppo_clip=ppo_clip, buffer_size=3, ppo_epochs=2)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # a checkpoint holds plain tensors and numbers: loadable with weights_only
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(4, 7):
        ctx_a, ctx_b = make_ctx(seed=step), make_ctx(seed=step)
        alpha_a, alpha_b = a.select(ctx_a), b.select(ctx_b)
        torch.testing.assert_close(alpha_a, alpha_b)
        a.update(-((alpha_a - 0.3) ** 2))
        b.update(-((alpha_b - 0.3) ** 2))
    for pa, pb in zip(a.network.parameters(), b.network.parameters()):
        torch.testing.assert_close(pa, pb)
    with pytest.raises(ValueError, match="granularity"):
        LearnedPolicy(granularity="token").load_state_dict(a.state_dict())


def test_constructor_validation():
    with pytest.raises(ValueError, match="granularity"):
        LearnedPolicy(granularity="document")
    with pytest.raises(ValueError, match="ppo_clip"):
        LearnedPolicy(ppo_clip=0.0)
    with pytest.raises(ValueError, match="init_concentration"):
        LearnedPolicy(init_alpha=0.1, init_concentration=4.0)


def _bandit(pol: LearnedPolicy, steps: int, noise: float, seed: int) -> float:
    ctx = make_ctx(b=2, t=4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        alpha = pol.select(ctx)
        pol.update(-((alpha - 0.2) ** 2) + noise * torch.randn((), generator=g))
    pol.deterministic = True
    return float(pol.select(ctx))


@pytest.mark.parametrize("seed", [0, 1])
def test_bandit_reinforce_finds_alpha_star(seed):
    pol = LearnedPolicy(granularity="batch", lr=1e-2, seed=seed)
    assert abs(_bandit(pol, steps=300, noise=0.0, seed=seed) - 0.2) < 0.05


def test_bandit_ppo_finds_alpha_star_under_noise():
    pol = LearnedPolicy(granularity="batch", lr=1e-2, ppo_clip=0.2, buffer_size=8, ppo_epochs=4, seed=0)
    assert abs(_bandit(pol, steps=200, noise=0.01, seed=0) - 0.2) < 0.05


def test_token_policy_learns_a_feature_dependent_alpha():
    """Tokens whose teacher is confident want alpha 0.8, the others 0.2: only correct pairing can learn this."""
    pol = LearnedPolicy(granularity="token", lr=1e-2, hidden_size=32, seed=0)
    for step in range(150):
        ctx = make_ctx(b=4, t=8, v=6, seed=step)
        confident = ctx.features.teacher_confidence > 0.5
        target = torch.where(confident, 0.8, 0.2)
        alpha = pol.select(ctx)
        pol.update(-((alpha - target) ** 2))
    pol.deterministic = True
    ctx = make_ctx(b=16, t=8, v=6, seed=10_000)
    alpha = pol.select(ctx)
    confident = (ctx.features.teacher_confidence > 0.5) & ctx.features.mask
    others = ~confident & ctx.features.mask
    assert float(alpha[confident].mean()) > 0.65
    assert float(alpha[others].mean()) < 0.35


def _load_toy():
    spec = importlib.util.spec_from_file_location("toy_distillation", REPO / "scripts" / "toy_distillation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_toy_distillation_learned_beats_the_worse_of_fkl_and_rkl():
    toy = _load_toy()
    cfg = toy.ToyConfig(steps=80)
    for seed in (0, 1, 2):
        built = toy.strategies(cfg, seed)
        fkl = toy.run(built["FKL only (alpha=1)"](), cfg, seed).final_d
        rkl = toy.run(built["RKL only (alpha=0)"](), cfg, seed).final_d
        learned = toy.run(built["learned, batch"](), cfg, seed)
        assert learned.final_d < max(fkl, rkl), (seed, learned.final_d, fkl, rkl)
        assert math.isfinite(learned.final_d) and len(learned.alphas) == cfg.steps


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
        alpha = pol.select(StepContext(features=gpu))
        assert alpha.device.type == "cuda"
        pol.update(-((alpha - 0.3) ** 2))
