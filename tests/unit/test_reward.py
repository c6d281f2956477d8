"""arkd.reward against torch.nn.functional and naive references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arkd import reward as R


def logits(seed: int = 0, shape=(3, 4, 7)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, t = 2 * torch.randn(*shape, generator=g), 2 * torch.randn(*shape, generator=g)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[0, 2:] = False
    mask[2, 0] = False
    return s, t, mask


def ref_token_d(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    log_q, log_p = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    fkl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
    rkl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(q || p)
    return 0.5 * (fkl + rkl)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_alignment_granularities_match_reference(temperature):
    s, t, mask = logits()
    d = ref_token_d(s, t, temperature)
    tok = R.alignment(s, t, mask, temperature=temperature, granularity="token")
    torch.testing.assert_close(tok, torch.where(mask, d, 0.0))
    seq = R.alignment(s, t, mask, temperature=temperature, granularity="sequence")
    torch.testing.assert_close(seq, torch.stack([d[b][mask[b]].mean() for b in range(3)]))
    batch = R.alignment(s, t, mask, temperature=temperature)
    assert batch.shape == ()
    torch.testing.assert_close(batch, d[mask].mean())
    assert float(R.alignment(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_rewards_are_detached_and_fp32():
    s, t, mask = logits()
    s = s.bfloat16().requires_grad_(True)
    out = R.alignment(s, t.bfloat16(), mask)
    assert out.dtype == torch.float32 and not out.requires_grad


def test_reduce_tokens_edge_cases():
    values = torch.tensor([[1.0, math.nan], [3.0, 5.0]])
    mask = torch.tensor([[True, False], [False, False]])
    torch.testing.assert_close(R.reduce_tokens(values, mask, "sequence"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(R.reduce_tokens(values, mask, "batch"), torch.tensor(1.0))
    torch.testing.assert_close(R.reduce_tokens(values, mask, "token"), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert float(R.reduce_tokens(values, torch.zeros(2, 2, dtype=torch.bool))) == 0.0
    with pytest.raises(ValueError, match="granularity"):
        R.reduce_tokens(values, mask, "document")


def test_same_batch_improvement_is_before_minus_after():
    s, t, mask = logits()
    closer = s + 0.5 * (t - s)  # halfway towards the teacher
    for gran in ("batch", "sequence", "token"):
        r = R.same_batch_improvement(s, closer, t, mask, granularity=gran)
        ref = R.alignment(s, t, mask, granularity=gran) - R.alignment(closer, t, mask, granularity=gran)
        torch.testing.assert_close(r, ref)
    assert float(R.same_batch_improvement(s, closer, t, mask)) > 0
    assert float(R.same_batch_improvement(closer, s, t, mask)) < 0
    torch.testing.assert_close(
        R.improvement(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0])), torch.tensor([2.0, -1.0])
    )


def test_next_batch_improvement_needs_scalars():
    assert float(R.next_batch_improvement(0.9, torch.tensor(0.5))) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="scalars"):
        R.next_batch_improvement(torch.ones(2), 0.5)


def test_teacher_baseline_matches_naive():
    s, t, mask = logits(1)
    r = R.teacher_baseline(s, t, mask, granularity="token")
    log_q, log_p = s.log_softmax(-1), t.log_softmax(-1)
    for b in range(3):
        for i in range(4):
            y = int(torch.argmax(t[b, i]))
            expected = float(log_q[b, i, y] - log_p[b, i, y]) if mask[b, i] else 0.0
            assert float(r[b, i]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(R.teacher_baseline(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_js_similarity_bounds_and_reference():
    s, t, mask = logits(2)
    r = R.js_similarity(s, t, mask, granularity="token")
    p, q = t.softmax(-1), s.softmax(-1)
    m = 0.5 * (p + q)
    js = 0.5 * ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1))
    torch.testing.assert_close(r, torch.where(mask, torch.exp(-js), 0.0))
    assert torch.all(r[mask] >= 0.5) and torch.all(r[mask] <= 1)
    assert float(R.js_similarity(t, t)) == pytest.approx(1.0)
    # disjoint supports: JS = log 2, similarity 1/2, no NaN from -inf logits
    a = torch.tensor([[[0.0, -math.inf]]])
    b = torch.tensor([[[-math.inf, 0.0]]])
    assert float(R.js_similarity(a, b)) == pytest.approx(0.5)


def test_bad_shapes_raise():
    s, t, mask = logits()
    with pytest.raises(ValueError, match="same shape"):
        R.alignment(s, t[..., :-1], mask)
    with pytest.raises(ValueError, match="mask shape"):
        R.js_similarity(s, t, mask[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        R.alignment(s, t, mask, temperature=0)


def test_linear_lookahead_equals_an_explicit_sgd_step():
    """theta - lr * (alpha g_F + (1 - alpha) g_R) is the SGD step on alpha * FKL + (1 - alpha) * RKL."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 7)
    x = torch.randn(2, 3, 5)
    teacher = torch.randn(2, 3, 7)
    mask = torch.ones(2, 3, dtype=torch.bool)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def divergence(z: torch.Tensor, alpha: float) -> torch.Tensor:
        log_q, log_p = z.log_softmax(-1), teacher.log_softmax(-1)
        fkl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        rkl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        return alpha * fkl + (1 - alpha) * rkl

    grads = {}
    for name, a in (("f", 1.0), ("r", 0.0)):
        model.zero_grad()
        divergence(model(x), a).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    d_before = R.alignment(model(x), teacher, mask)

    def reward_fn(new_params):
        z = torch.func.functional_call(model, new_params, (x,))
        return d_before - R.alignment(z, teacher, mask)

    lookahead = R.linear_lookahead(params, grads["f"], grads["r"], lr=0.5, reward_fn=reward_fn)
    for alpha in (0.0, 0.3, 1.0):
        stepped = torch.nn.Linear(5, 7)
        stepped.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(stepped.parameters(), lr=0.5)
        divergence(stepped(x), alpha).backward()
        opt.step()
        expected = float(d_before - R.alignment(stepped(x), teacher, mask))
        assert lookahead(alpha) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # parameters without gradients stay put
    frozen = R.linear_lookahead(params, {}, {}, lr=0.5, reward_fn=reward_fn)
    assert frozen(0.5) == pytest.approx(0.0, abs=1e-6)


def _divergence(z: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    log_q, log_p = z.log_softmax(-1), teacher.log_softmax(-1)
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    return alpha * fkl + (1 - alpha) * rkl


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
        (torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.05}),  # L2 added to the gradient
        (torch.optim.Adam, {"lr": 0.05, "amsgrad": True, "betas": (0.8, 0.9)}),
        (torch.optim.AdamW, {"lr": 0.05, "maximize": True, "eps": 1e-3}),
    ],
)
@pytest.mark.parametrize("prior_steps", [0, 3])
def test_adam_step_preview_equals_the_optimizer_step(cls, options, prior_steps):
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 3)
    opt = cls(model.parameters(), **options)
    for _ in range(prior_steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    params = dict(model.named_parameters())

    def snapshot():
        return {(n, k): v.clone() for n, p in model.named_parameters() for k, v in opt.state.get(p, {}).items()}

    state_before, params_before = snapshot(), {n: p.detach().clone() for n, p in params.items()}
    preview = R.adam_step_preview(opt)(params, grads)
    # the preview left the optimiser's state and the parameters alone
    state_after = snapshot()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[key], value) for key, value in state_before.items())
    assert all(torch.equal(p, params_before[n]) for n, p in params.items())
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(preview[name], p.detach(), rtol=1e-5, atol=1e-7)


def test_lookahead_with_the_adam_preview_and_clipping_equals_the_trainers_step():
    """What greedy scores is the alignment after the step the trainer would really take: clip, then AdamW."""
    import copy

    torch.manual_seed(2)
    model = torch.nn.Linear(5, 7)
    x, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 7)
    mask = torch.ones(2, 3, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    for _ in range(2):  # some optimiser state first
        opt.zero_grad()
        _divergence(model(x), teacher, 0.5).backward()
        opt.step()
    grads = {}
    for name, a in (("f", 1.0), ("r", 0.0)):
        model.zero_grad()
        _divergence(model(x), teacher, a).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    d_before = R.alignment(model(x), teacher, mask)

    def reward_fn(new_params):
        return d_before - R.alignment(torch.func.functional_call(model, new_params, (x,)), teacher, mask)

    lookahead = R.linear_lookahead(
        dict(model.named_parameters()),
        grads["f"],
        grads["r"],
        lr=0.0,
        reward_fn=reward_fn,
        update=R.adam_step_preview(opt),
        max_grad_norm=0.05,
    )
    for alpha in (0.0, 0.25, 0.5, 1.0):
        reward = lookahead(alpha)  # before the twin's step
        twin = copy.deepcopy(model)
        twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.02, weight_decay=0.01)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the moment tensors
        twin.zero_grad()
        _divergence(twin(x), teacher, alpha).backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        twin_opt.step()
        expected = float(d_before - R.alignment(twin(x), teacher, mask))
        assert reward == pytest.approx(expected, rel=1e-4, abs=1e-7), alpha


def test_adam_step_preview_refuses_other_optimizers_and_foreign_parameters():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="expected torch.optim.Adam or AdamW"):
        R.adam_step_preview(torch.optim.SGD(model.parameters(), lr=0.1))
    preview = R.adam_step_preview(torch.optim.AdamW(model.parameters()))
    copies = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="none of the parameters"):
        preview(copies, {n: torch.ones_like(p) for n, p in copies.items()})
