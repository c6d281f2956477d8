"""arkd.policy.lookahead: the step preview against explicit optimiser steps."""

from __future__ import annotations

import copy

import pytest
import torch

from arkd import reward as R
from arkd.policy.lookahead import BatchScorer, StepPreview, adam_step_preview, sgd_step_preview


def test_preview_equals_an_explicit_sgd_step():
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

    # g(alpha) = g_R + alpha (g_F - g_R): the preview of alpha 0 shifted by alpha
    direction = {n: grads["f"][n] - grads["r"][n] for n in grads["f"]}
    opt0 = torch.optim.SGD(model.parameters(), lr=0.5)
    preview = StepPreview(dict(model.named_parameters()), grads["r"], sgd_step_preview(opt0), alpha=0.0,
                          direction=direction)  # fmt: skip

    def lookahead(alpha):
        return float(reward_fn(preview.params_at(alpha)))

    for alpha in (0.0, 0.3, 1.0):
        stepped = torch.nn.Linear(5, 7)
        stepped.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(stepped.parameters(), lr=0.5)
        divergence(stepped(x), alpha).backward()
        opt.step()
        expected = float(d_before - R.alignment(stepped(x), teacher, mask))
        assert lookahead(alpha) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # parameters without gradients stay put
    frozen = StepPreview(dict(model.named_parameters()), {}, sgd_step_preview(opt0), alpha=0.0, direction={})
    assert float(reward_fn(frozen.params_at(0.5))) == pytest.approx(0.0, abs=1e-6)
    del params


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
    preview = adam_step_preview(opt)(params, grads)
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


def test_preview_with_adam_and_clipping_equals_the_trainers_step():
    """What greedy, the probe and the paired reward score is the step the trainer would really take: clip, AdamW."""

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

    direction = {n: grads["f"][n] - grads["r"][n] for n in grads["f"]}
    preview = StepPreview(dict(model.named_parameters()), grads["r"], adam_step_preview(opt), alpha=0.0,
                          direction=direction, max_grad_norm=0.05)  # fmt: skip
    for alpha in (0.0, 0.25, 0.5, 1.0):
        reward = float(reward_fn(preview.params_at(alpha)))  # before the twin's step
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
        adam_step_preview(torch.optim.SGD(model.parameters(), lr=0.1))
    preview = adam_step_preview(torch.optim.AdamW(model.parameters()))
    copies = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="none of the parameters"):
        preview(copies, {n: torch.ones_like(p) for n, p in copies.items()})


def test_equal_norm_rescales_candidates_to_the_applied_step():
    g = {"w": torch.tensor([3.0, 4.0])}
    d = {"w": torch.tensor([1.0, 0.0])}
    w = torch.zeros(2)
    preview = StepPreview({"w": w}, g, lambda p, gr: {n: p[n] - gr[n] for n in gr}, alpha=0.5, direction=d,
                          equal_norm=True)  # fmt: skip
    moved = preview.params_at(0.5)["w"]
    assert float(torch.linalg.vector_norm(moved)) == pytest.approx(5.0)  # |g(alpha)| = 5, direction changed
    assert float(moved[0]) == pytest.approx(-3.5 * 5 / (3.5**2 + 16) ** 0.5)
    torch.testing.assert_close(preview.params_at(0.0)["w"], -g["w"])  # the applied step itself is unchanged
    with pytest.raises(RuntimeError, match="direction"):
        StepPreview({"w": w}, g, lambda p, gr: dict(p), alpha=0.5).gradient(0.1)


def test_batch_scorer_is_d_in_eval_mode_at_given_parameters():
    torch.manual_seed(3)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.drop(self.emb(input_ids))})()

    net = Net().train()
    ids = torch.randint(0, 11, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    teacher = torch.randn(2, 4, 6)
    mask = torch.ones(2, 4, dtype=torch.bool)
    scorer = BatchScorer(net, [batch], [teacher], [mask], lambda s, t, m: R.token_alignment(s, t, m))
    expected = float(R.alignment(net.emb(ids)[:, :-1], teacher, mask))
    assert scorer() == pytest.approx(expected, rel=1e-5) and scorer() == scorer()  # no dropout noise
    moved = {"emb.weight": net.emb.weight.detach() * 2}
    assert scorer(moved) == pytest.approx(float(R.alignment(2 * net.emb(ids)[:, :-1], teacher, mask)), rel=1e-5)
    assert net.training and scorer.forwards == 4
