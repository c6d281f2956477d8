"""arkd.losses.functional against naive formulas written here, torch.nn.functional.kl_div and closed-form limits."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

import arkd.losses as L

SHAPE = (3, 47, 123)  # odd on purpose
SMALL = (2, 5, 17)


def _logits(shape=SHAPE, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    return s, t


def _mask(shape, seed=1, p=0.7):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < p
    m.view(-1)[0] = True
    return m


# ---------------------------------------------------------------------------------------------- naive references
# Written independently from the library: plain probabilities, no log-softmax tricks, finite logits only.
def _pq(s, t, T=1.0):
    return torch.softmax(t / T, -1), torch.softmax(s / T, -1)


def naive_fkl(s, t, T=1.0):
    p, q = _pq(s, t, T)
    return (p * torch.log(p / q)).sum(-1)


def naive_rkl(s, t, T=1.0):
    p, q = _pq(s, t, T)
    return (q * torch.log(q / p)).sum(-1)


def naive_gjsd(s, t, T=1.0, beta=0.5):
    p, q = _pq(s, t, T)
    m = beta * p + (1 - beta) * q
    return beta * (p * torch.log(p / m)).sum(-1) + (1 - beta) * (q * torch.log(q / m)).sum(-1)


def naive_tvd(s, t, T=1.0):
    p, q = _pq(s, t, T)
    return 0.5 * (p - q).abs().sum(-1)


def naive_skl(s, t, T=1.0, skew=0.1):
    p, q = _pq(s, t, T)
    return (p * torch.log(p / (skew * p + (1 - skew) * q))).sum(-1)


def naive_srkl(s, t, T=1.0, skew=0.1):
    p, q = _pq(s, t, T)
    return (q * torch.log(q / (skew * q + (1 - skew) * p))).sum(-1)


def naive_todi(s, t, T=1.0):
    p, q = _pq(s, t, T)
    w = (p / (p + q)).detach()
    return (w * p * torch.log(p / q) + (1 - w) * q * torch.log(q / p)).sum(-1)


def naive_ab(s, t, T=1.0, alpha=0.3, beta=0.6):
    p, q = _pq(s, t, T)
    a, b = alpha, beta
    return -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)


def naive_entropy_gated(s, t, T=1.0, weight=3.0):
    p, q = _pq(s, t, T)
    hp = -(p * p.log()).sum(-1).detach()
    hq = -(q * q.log()).sum(-1).detach()
    wf = torch.where(hp > hq, weight, 1.0)
    wr = torch.where(hq > hp, weight, 1.0)
    return wf * (p * torch.log(p / q)).sum(-1) + wr * (q * torch.log(q / p)).sum(-1)


def naive_taid(s, t, T=1.0, tt=0.3):
    pt = torch.softmax(((1 - tt) * s.detach() + tt * t) / T, -1)
    q = torch.softmax(s / T, -1)
    return (pt * torch.log(pt / q)).sum(-1)


def naive_bidirectional(s, t, T=1.0, alpha=0.3):
    return alpha * naive_fkl(s, t, T) + (1 - alpha) * naive_rkl(s, t, T)


NAIVE_CASES = {
    "forward_kl": (L.forward_kl, {}, naive_fkl),
    "reverse_kl": (L.reverse_kl, {}, naive_rkl),
    "bidirectional_kl": (L.bidirectional_kl, {"alpha": 0.3}, naive_bidirectional),
    "generalized_jsd": (L.generalized_jsd, {"beta": 0.3}, lambda s, t, T: naive_gjsd(s, t, T, 0.3)),
    "js_divergence": (L.js_divergence, {}, naive_gjsd),
    "total_variation": (L.total_variation, {}, naive_tvd),
    "skew_forward_kl": (L.skew_forward_kl, {"skew": 0.1}, naive_skl),
    "skew_reverse_kl": (L.skew_reverse_kl, {"skew": 0.1}, naive_srkl),
    "token_wise_kl": (L.token_wise_kl, {}, naive_todi),
    "alpha_beta_divergence": (L.alpha_beta_divergence, {"alpha": 0.3, "beta": 0.6}, naive_ab),
    "entropy_gated_kl": (L.entropy_gated_kl, {}, naive_entropy_gated),
    "taid_kl": (L.taid_kl, {"t": 0.3}, naive_taid),
}


@pytest.mark.parametrize("name", sorted(NAIVE_CASES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_naive_formula_values_and_gradients(name, temperature):
    fn, hyper, naive = NAIVE_CASES[name]
    s, t = _logits(SMALL, seed=3)
    got = fn(s, t, temperature=temperature, reduction="none", **hyper)
    ref = naive(s, t, temperature)
    assert got.shape == SMALL[:-1]
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    weights = torch.rand(SMALL[:-1], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g_got = torch.autograd.grad((got * weights).sum(), (s, t))
    g_ref = torch.autograd.grad((ref * weights).sum(), (s, t))
    torch.testing.assert_close(g_got[0], g_ref[0], rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(g_got[1], g_ref[1], rtol=1e-8, atol=1e-11)


def test_forward_and_reverse_kl_match_torch_kl_div():
    s, t = _logits(SHAPE)
    m = _mask(SHAPE[:-1])
    log_q, log_p = TF.log_softmax(s / 2.0, -1), TF.log_softmax(t / 2.0, -1)
    fkl_ref = TF.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    rkl_ref = TF.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    fkl = L.forward_kl(s, t, m, temperature=2.0)
    rkl = L.reverse_kl(s, t, m, temperature=2.0)
    torch.testing.assert_close(fkl, fkl_ref[m].mean())
    torch.testing.assert_close(rkl, rkl_ref[m].mean())
    for got, ref in ((fkl, fkl_ref[m].mean()), (rkl, rkl_ref[m].mean())):
        g1 = torch.autograd.grad(got, (s, t))
        g2 = torch.autograd.grad(ref, (s, t), retain_graph=True)
        torch.testing.assert_close(g1[0], g2[0])
        torch.testing.assert_close(g1[1], g2[1])
    # "batchmean" over flat tokens is torch's KD convention: same as reduction="mean" without a mask
    flat_ref = TF.kl_div(log_q.reshape(-1, 123), log_p.reshape(-1, 123), reduction="batchmean", log_target=True)
    torch.testing.assert_close(L.forward_kl(s, t, temperature=2.0), flat_ref)


def _naive_akl_token(p: list[float], q: list[float], mu: float) -> tuple[float, float]:
    """AKL's weights for one token by a plain Python loop: (w_head, w_tail)."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    head, cumulative = set(), 0.0
    for rank, i in enumerate(order):
        cumulative += p[i]
        if rank == 0 or cumulative <= mu:
            head.add(i)
    g_head = sum(abs(p[i] - q[i]) for i in range(len(p)) if i in head)
    g_tail = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
    return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


@pytest.mark.parametrize("mu", [0.5, 0.2, 0.9])
def test_adaptive_kl_against_naive_per_token_loop(mu):
    s, t = _logits(SMALL, seed=7)
    got = L.adaptive_kl(s, t, mu=mu, reduction="none")
    p, q = _pq(s, t)
    fkl, rkl = naive_fkl(s, t), naive_rkl(s, t)
    ref = torch.empty(SMALL[:-1], dtype=torch.float64)
    refs = []
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in SMALL[:-1]]):
        i, j = idx.tolist()
        wh, wt = _naive_akl_token(p[i, j].tolist(), q[i, j].tolist(), mu)
        ref[i, j] = wh * fkl[i, j].item() + wt * rkl[i, j].item()
        refs.append(wh * fkl[i, j] + wt * rkl[i, j])
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    # gradients: the weights are constants
    g1 = torch.autograd.grad(got.sum(), s)[0]
    g2 = torch.autograd.grad(torch.stack(refs).sum(), s)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)


def test_adaptive_kl_head_mask_lives_in_sorted_space():
    # Teacher mass is NOT sorted by index: the head is {2} (p=0.6 > mu); a head mask applied in index space would
    # select index 0 (p=0.1) instead and give a different weight.
    p = torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.3, 0.4]], dtype=torch.float64)
    got = L.adaptive_kl(q.log(), p.log(), mu=0.5, reduction="none")
    g_head, g_tail = 0.2, 0.2  # |0.6 - 0.4| ; |0.1 - 0.3| + |0.3 - 0.3|
    fkl = (p * (p / q).log()).sum()
    rkl = (q * (q / p).log()).sum()
    expected = g_head / (g_head + g_tail) * fkl + g_tail / (g_head + g_tail) * rkl
    torch.testing.assert_close(got[0], expected)
    p2 = torch.tensor([[0.1, 0.3, 0.6]], dtype=torch.float64)
    q2 = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)  # head gap 0.4, tail gap 0.4 -> then shift the tail
    q3 = torch.tensor([[0.1, 0.5, 0.4]], dtype=torch.float64)  # head gap 0.2, tail gap 0.2 + 0 -> w = 0.5 / 0.5
    for qq in (q2, q3):
        wh, wt = _naive_akl_token(p2[0].tolist(), qq[0].tolist(), 0.5)
        exp = wh * (p2 * (p2 / qq).log()).sum() + wt * (qq * (qq / p2).log()).sum()
        torch.testing.assert_close(L.adaptive_kl(qq.log(), p2.log(), reduction="none")[0], exp)


def _naive_drkl_token(p: torch.Tensor, q: torch.Tensor, y: int, gamma: float) -> torch.Tensor:
    qy, py = q[y], p[y]
    binary = qy * torch.log(qy / py) + (1 - qy) * torch.log((1 - qy) / (1 - py))
    keep = torch.arange(len(p)) != y
    q_hat, p_hat = q[keep] / (1 - qy), p[keep] / (1 - py)
    return binary + gamma * (q_hat * torch.log(q_hat / p_hat)).sum()


@pytest.mark.parametrize("gamma", [0.5, 0.0, 1.3])
def test_diversity_aware_rkl_against_naive(gamma):
    s, t = _logits(SMALL, seed=11)
    y = torch.randint(0, SMALL[-1], SMALL[:-1], generator=torch.Generator().manual_seed(2))
    got = L.diversity_aware_rkl(s, t, target_ids=y, gamma=gamma, reduction="none")
    p, q = _pq(s, t)
    refs = torch.stack(
        [_naive_drkl_token(p[i, j], q[i, j], int(y[i, j]), gamma) for i in range(SMALL[0]) for j in range(SMALL[1])]
    ).reshape(SMALL[:-1])
    torch.testing.assert_close(got, refs, rtol=1e-9, atol=1e-12)
    g1 = torch.autograd.grad(got.sum(), (s, t))
    g2 = torch.autograd.grad(refs.sum(), (s, t))
    torch.testing.assert_close(g1[0], g2[0], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(g1[1], g2[1], rtol=1e-8, atol=1e-12)


def test_diversity_aware_rkl_with_gamma_one_minus_qy_is_rkl():
    s, t = _logits(SHAPE, seed=12)
    y = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(3))
    q_y = torch.softmax(s, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    got = L.diversity_aware_rkl(s, t, target_ids=y, gamma=(1 - q_y).detach(), reduction="none")
    torch.testing.assert_close(got, L.reverse_kl(s, t, reduction="none"), rtol=1e-10, atol=1e-12)


def test_diversity_aware_rkl_with_a_certain_student_stays_finite():
    # q_y rounds to exactly 1 in float32 (log q_y == 0): no log(0) in values or gradients
    s = torch.zeros(2, 17)
    s[:, 3] = 100.0
    s.requires_grad_(True)
    t = torch.randn(2, 17, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([3, 4])
    assert torch.log_softmax(s, -1)[0, 3].item() == 0.0
    values = L.diversity_aware_rkl(s, t, target_ids=y, reduction="none")
    assert torch.isfinite(values).all()
    assert torch.isfinite(torch.autograd.grad(values.sum(), s)[0]).all()
    torch.testing.assert_close(values[0], L.reverse_kl(s, t, reduction="none")[0], rtol=1e-5, atol=1e-5)


def test_diversity_aware_rkl_ignores_negative_targets_and_rejects_large_ids():
    s, t = _logits(SMALL, seed=13)
    y = torch.randint(0, SMALL[-1], SMALL[:-1], generator=torch.Generator().manual_seed(4))
    y_ignored = y.clone()
    y_ignored[0, :2] = -100
    counted = y_ignored >= 0
    full = L.diversity_aware_rkl(s, t, target_ids=y, reduction="none")
    got = L.diversity_aware_rkl(s, t, target_ids=y_ignored, reduction="mean")
    torch.testing.assert_close(got, full[counted].mean())
    with pytest.raises(ValueError, match="vocabulary size 17"):
        L.diversity_aware_rkl(s, t, target_ids=torch.full(SMALL[:-1], 17))
    with pytest.raises(ValueError, match="target_ids"):
        L.diversity_aware_rkl(s, t, target_ids=y[0])


# ------------------------------------------------------------------------------------------- closed-form limits
def test_endpoints_of_parametrised_divergences():
    s, t = _logits(SHAPE, seed=21)
    fkl = L.forward_kl(s, t, reduction="none")
    rkl = L.reverse_kl(s, t, reduction="none")
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=0.0, reduction="none"), fkl, **close)
    torch.testing.assert_close(L.generalized_jsd(s, t, beta=1.0, reduction="none"), rkl, **close)
    torch.testing.assert_close(L.bidirectional_kl(s, t, alpha=1.0, reduction="none"), fkl, **close)
    torch.testing.assert_close(L.bidirectional_kl(s, t, alpha=0.0, reduction="none"), rkl, **close)
    torch.testing.assert_close(L.skew_forward_kl(s, t, skew=0.0, reduction="none"), fkl, **close)
    torch.testing.assert_close(L.skew_reverse_kl(s, t, skew=0.0, reduction="none"), rkl, **close)
    torch.testing.assert_close(L.alpha_beta_divergence(s, t, alpha=1.0, beta=0.0, reduction="none"), fkl, **close)
    torch.testing.assert_close(L.alpha_beta_divergence(s, t, alpha=0.0, beta=1.0, reduction="none"), rkl, **close)
    torch.testing.assert_close(L.taid_kl(s, t, t=1.0, reduction="none"), fkl, **close)
    assert torch.all(L.taid_kl(s, t, t=0.0, reduction="none").abs() < 1e-12)
    torch.testing.assert_close(
        L.generalized_jsd(s, t, beta=0.5, reduction="none"), L.js_divergence(s, t, reduction="none")
    )
    # the interior formula tends to 0 at both ends (why the endpoints are special cases)
    assert L.generalized_jsd(s, t, beta=1e-7).abs() < 1e-5
    assert L.generalized_jsd(s, t, beta=1 - 1e-7).abs() < 1e-5


def test_symmetries_and_bounds():
    s, t = _logits(SHAPE, seed=22, scale=4.0)
    js = L.js_divergence(s, t, reduction="none")
    torch.testing.assert_close(js, L.js_divergence(t, s, reduction="none"))
    assert torch.all(js <= math.log(2) + 1e-12) and torch.all(js >= 0)
    tvd = L.total_variation(s, t, reduction="none")
    torch.testing.assert_close(tvd, L.total_variation(t, s, reduction="none"))
    assert torch.all(tvd <= 1 + 1e-12) and torch.all(tvd >= 0)
    # disjoint supports reach the bounds
    big = torch.tensor([[50.0, -50.0]], dtype=torch.float64)
    assert abs(L.js_divergence(big, big.flip(-1)).item() - math.log(2)) < 1e-12
    assert abs(L.total_variation(big, big.flip(-1)).item() - 1.0) < 1e-12


@pytest.mark.parametrize(
    "fn,hyper",
    [(L.forward_kl, {}), (L.reverse_kl, {}), (L.bidirectional_kl, {}), (L.generalized_jsd, {"beta": 0.2}),
     (L.js_divergence, {}), (L.total_variation, {}), (L.skew_forward_kl, {}), (L.skew_reverse_kl, {}),
     (L.adaptive_kl, {}), (L.token_wise_kl, {}), (L.alpha_beta_divergence, {"alpha": 0.4, "beta": 0.9}),
     (L.alpha_beta_divergence, {"alpha": 1.5, "beta": -0.5}), (L.entropy_gated_kl, {}), (L.taid_kl, {"t": 0.6})],
)  # fmt: skip
def test_zero_iff_equal_and_nonnegative(fn, hyper):
    s, t = _logits(SMALL, seed=23)
    same = fn(s, s.detach(), reduction="none", **hyper)
    assert torch.all(same.abs() < 1e-12)
    diff = fn(s, t, reduction="none", **hyper)
    assert torch.all(diff > 0)


@pytest.mark.parametrize(
    "exact,near",
    [
        ((0.7, 0.0), (0.7, 2e-6)),
        ((0.0, 0.8), (2e-6, 0.8)),
        ((0.6, -0.6), (0.6, -0.6 + 2e-6)),
        ((0.0, 0.0), (2e-6, -1e-6)),
    ],
)
def test_alpha_beta_limiting_forms_are_continuous(exact, near):
    s, t = _logits(SMALL, seed=24)
    limit = L.alpha_beta_divergence(s, t, alpha=exact[0], beta=exact[1], reduction="none")
    # the general formula just outside the tolerance (float64) approaches the limiting form
    a, b = (exact[0] + (near[0] - exact[0]) * 100, exact[1] + (near[1] - exact[1]) * 100)
    general = naive_ab(s, t, alpha=a, beta=b) if abs(a + b) > 1e-12 and a and b else None
    if general is not None:
        torch.testing.assert_close(limit, general, rtol=2e-3, atol=1e-5)
    # and the limiting branch itself is continuous inside the tolerance
    inside = L.alpha_beta_divergence(s, t, alpha=near[0], beta=near[1], reduction="none")
    torch.testing.assert_close(limit, inside, rtol=1e-4, atol=1e-6)
    if exact == (0.0, 0.0):
        ref = 0.5 * ((torch.log_softmax(t, -1) - torch.log_softmax(s, -1)) ** 2).sum(-1)
        torch.testing.assert_close(limit, ref)


def test_temperature_divides_the_logits():
    s, t = _logits(SMALL, seed=25)
    for fn in (L.forward_kl, L.reverse_kl, L.bidirectional_kl, L.total_variation, L.adaptive_kl, L.taid_kl):
        torch.testing.assert_close(fn(s, t, temperature=3.0), fn(s / 3.0, t / 3.0))


# ------------------------------------------------------------------------------------------- reductions and masks
def test_masked_reduce_modes():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert L.masked_reduce(values, mask, "sum").item() == 1 + 2 + 5 + 6
    assert L.masked_reduce(values, mask, "mean").item() == pytest.approx((1 + 2 + 5 + 6) / 4)
    none = L.masked_reduce(values, mask, "none")
    assert none.tolist() == [[1.0, 2.0, 0.0], [0.0, 5.0, 6.0]]
    grad = torch.autograd.grad(L.masked_reduce(values, mask, "mean"), values)[0]
    assert torch.equal(grad, mask.float() / 4)
    assert L.masked_reduce(values.detach()[1], None, "mean").item() == 5.0
    with pytest.raises(ValueError, match="reduction"):
        L.masked_reduce(values, mask, "avg")


ALL_FUNCTIONS = [
    (L.forward_kl, {}),
    (L.reverse_kl, {}),
    (L.bidirectional_kl, {"alpha": 0.3}),
    (L.generalized_jsd, {"beta": 0.3}),
    (L.js_divergence, {}),
    (L.total_variation, {}),
    (L.skew_forward_kl, {}),
    (L.skew_reverse_kl, {}),
    (L.adaptive_kl, {}),
    (L.token_wise_kl, {}),
    (L.alpha_beta_divergence, {"alpha": 0.3, "beta": 0.6}),
    (L.entropy_gated_kl, {}),
    (L.taid_kl, {"t": 0.4}),
    (L.diversity_aware_rkl, {"target_ids": None}),
]
IDS = [fn.__name__ for fn, _ in ALL_FUNCTIONS]


def _call(fn, hyper, s, t, mask=None, **kw):
    hyper = dict(hyper)
    if "target_ids" in hyper:
        hyper["target_ids"] = torch.arange(s.shape[:-1].numel()).reshape(s.shape[:-1]) % s.shape[-1]
    return fn(s, t, mask, **hyper, **kw)


@pytest.mark.parametrize("fn,hyper", ALL_FUNCTIONS, ids=IDS)
def test_reductions_and_masks(fn, hyper):
    s, t = _logits(SMALL, seed=31)
    m = _mask(SMALL[:-1], seed=32)
    per_token = _call(fn, hyper, s, t, reduction="none")
    assert per_token.shape == SMALL[:-1]
    masked_none = _call(fn, hyper, s, t, m, reduction="none")
    torch.testing.assert_close(masked_none, torch.where(m, per_token, 0.0))
    torch.testing.assert_close(_call(fn, hyper, s, t, m, reduction="sum"), per_token[m].sum())
    torch.testing.assert_close(_call(fn, hyper, s, t, m, reduction="mean"), per_token[m].mean())
    torch.testing.assert_close(_call(fn, hyper, s, t, reduction="mean"), per_token.mean())


@pytest.mark.parametrize("fn,hyper", ALL_FUNCTIONS, ids=IDS)
def test_all_masked_batch_is_zero_with_a_gradient_path(fn, hyper):
    s, t = _logits(SMALL, seed=33, dtype=torch.float32)
    nothing = torch.zeros(SMALL[:-1], dtype=torch.bool)
    for reduction in ("mean", "sum"):
        loss = _call(fn, hyper, s, t, nothing, reduction=reduction)
        assert loss.item() == 0.0 and loss.requires_grad
        grad = torch.autograd.grad(loss, s)[0]
        assert torch.all(grad == 0)


# ------------------------------------------------------------------------------------------------- -inf and dtypes
@pytest.mark.parametrize("fn,hyper", ALL_FUNCTIONS, ids=IDS)
def test_shared_neg_inf_entries_are_exactly_dropped(fn, hyper):
    """Both sides -inf on the same padded / banned entries: finite, no NaN, and equal to dropping those entries."""
    s, t = _logits(SMALL, seed=41)
    pad = 5
    banned = torch.zeros(SMALL, dtype=torch.bool)
    banned[..., -pad:] = True
    banned[0, 1, 3] = True  # a banned token inside the vocabulary too
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    s_inf, t_inf = torch.where(banned, ninf, s), torch.where(banned, ninf, t)
    got = _call(fn, hyper, s_inf, t_inf, reduction="none")
    assert torch.isfinite(got).all()
    grads = torch.autograd.grad(got.sum(), (s, t))
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(torch.all(g[banned] == 0) for g in grads)
    # same as the computation on the vocabulary without the padded columns
    ref = _call(fn, hyper, s_inf[..., :-pad], t_inf[..., :-pad], reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_student_neg_inf_where_teacher_has_mass():
    s, t = _logits(SMALL, seed=42)
    s_inf = s.detach().clone()
    s_inf[0, 0, 0] = float("-inf")
    s_inf.requires_grad_(True)
    fkl = L.forward_kl(s_inf, t, reduction="none")
    assert fkl[0, 0].item() == float("inf")  # the true value
    assert torch.isfinite(fkl.flatten()[1:]).all()
    rkl = L.reverse_kl(s_inf, t, reduction="none")
    assert torch.isfinite(rkl).all()
    grad = torch.autograd.grad(rkl.sum(), s_inf)[0]
    assert torch.isfinite(grad).all()
    # bounded divergences stay finite
    for fn in (L.js_divergence, L.total_variation, L.skew_forward_kl):
        values = fn(s_inf, t, reduction="none")
        assert torch.isfinite(values).all()
        assert torch.isfinite(torch.autograd.grad(values.sum(), s_inf)[0]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn,hyper", ALL_FUNCTIONS, ids=IDS)
def test_half_precision_inputs_use_float32_math(fn, hyper, dtype):
    s, t = _logits(SMALL, seed=43, dtype=dtype)
    got = _call(fn, hyper, s, t, reduction="none")
    assert got.dtype == torch.float32
    ref = _call(fn, hyper, s.detach().float(), t.detach().float(), reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    grad = torch.autograd.grad(got.sum(), s)[0]
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


# --------------------------------------------------------------------------------------------------------- errors
def test_mismatched_vocabulary_names_both_sizes_and_the_helper_fixes_it():
    s = torch.randn(2, 3, 50257)
    t = torch.randn(2, 3, 50304)
    with pytest.raises(ValueError, match=r"50257.*50304"):
        L.forward_kl(s, t)
    with pytest.raises(ValueError, match=r"50257.*50304"):
        L.bidirectional_kl(s, t)
    s2, t2 = L.truncate_to_common_vocab(s, t)
    assert s2.shape == t2.shape == (2, 3, 50257)
    assert s2.data_ptr() == s.data_ptr()  # a view
    s3, t3 = L.truncate_to_common_vocab(s, t, vocab_size=50000)
    assert s3.shape[-1] == t3.shape[-1] == 50000
    torch.testing.assert_close(L.forward_kl(s3, t3), L.forward_kl(s[..., :50000].clone(), t[..., :50000].clone()))
    with pytest.raises(ValueError, match="exceeds"):
        L.truncate_to_common_vocab(s, t, vocab_size=50300)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reduction": "avg"}, "reduction"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_common_arguments(kwargs, match):
    s, t = _logits(SMALL)
    for fn in (L.forward_kl, L.bidirectional_kl, L.taid_kl):
        with pytest.raises(ValueError, match=match):
            fn(s, t, **kwargs)


def test_bad_shapes_and_hyper_parameters():
    s, t = _logits(SMALL)
    with pytest.raises(ValueError, match="mask has shape"):
        L.forward_kl(s, t, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        L.forward_kl(s, t[:1])
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="skew"):
        L.skew_forward_kl(s, t, skew=1.0)
    with pytest.raises(ValueError, match="mu"):
        L.adaptive_kl(s, t, mu=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        L.bidirectional_kl(s, t, alpha=1.2)
    with pytest.raises(ValueError, match="alpha"):
        L.alpha_beta_divergence(s, t, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"\bt\b"):
        L.taid_kl(s, t, t=2.0)
    with pytest.raises(ValueError, match="weight"):
        L.entropy_gated_kl(s, t, weight=0.0)


def test_entropy_gate_directions():
    # teacher flat (high entropy), student peaked: FKL weighted 3; and the other way round
    flat = torch.zeros(1, 4, dtype=torch.float64)
    peaked = torch.tensor([[4.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    fkl = L.forward_kl(peaked, flat)
    rkl = L.reverse_kl(peaked, flat)
    torch.testing.assert_close(L.entropy_gated_kl(peaked, flat), 3 * fkl + rkl)
    torch.testing.assert_close(
        L.entropy_gated_kl(flat, peaked, weight=2.0), L.forward_kl(flat, peaked) + 2 * L.reverse_kl(flat, peaked)
    )
    # equal entropies (a permutation): plain FKL + RKL
    perm = peaked[:, [1, 0, 2, 3]]
    torch.testing.assert_close(
        L.entropy_gated_kl(peaked, perm), L.forward_kl(peaked, perm) + L.reverse_kl(peaked, perm)
    )


def test_import_pulls_no_heavy_frameworks():
    code = (
        "import sys, arkd.losses\n"
        "bad = [m for m in ('transformers', 'accelerate', 'hydra', 'omegaconf', 'datasets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_tensor_alpha_outside_the_unit_interval_is_refused_like_a_float():
    from arkd.losses import bidirectional_kl, fused_linear_bidirectional_kl

    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    for bad in (torch.tensor(1.5), torch.tensor([0.2, -0.1]), torch.tensor([[0.5, float("nan"), 0.5]] * 2)):
        with pytest.raises(ValueError, match=r"alpha must hold values in \[0, 1\]"):
            bidirectional_kl(s, t, alpha=bad)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        bidirectional_kl(s, t, alpha=1.5)
    with pytest.raises(ValueError, match=r"alpha must hold values in \[0, 1\]"):
        fused_linear_bidirectional_kl(torch.randn(2, 3, 4), torch.randn(5, 4), t, alpha=torch.tensor(2.0))
    assert torch.isfinite(bidirectional_kl(s, t, alpha=torch.tensor([0.0, 1.0])))
