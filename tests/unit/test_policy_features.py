"""compute_features and RunningNorm against naive per-token references."""

from __future__ import annotations

import math

import pytest
import torch

from arkd.policy import FEATURE_NAMES, RunningNorm, compute_features


def naive_token_stats(s: list[float], t: list[float], temperature: float = 1.0, mu: float = 0.5) -> dict[str, float]:
    """Plain-Python statistics of one position (lists of logits)."""

    def softmax(z):
        z = [x / temperature for x in z]
        m = max(z)
        e = [math.exp(x - m) if x != -math.inf else 0.0 for x in z]
        total = sum(e)
        return [x / total for x in e]

    p, q = softmax(t), softmax(s)
    fkl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)
    rkl = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q) if qi > 0)
    h_p = -sum(pi * math.log(pi) for pi in p if pi > 0)
    h_q = -sum(qi * math.log(qi) for qi in q if qi > 0)
    order = sorted(range(len(p)), key=lambda v: -p[v])
    head, cum = set(), 0.0
    for rank, v in enumerate(order):
        cum += p[v]
        if cum <= mu or rank == 0:
            head.add(v)
    g_head = sum(abs(p[v] - q[v]) for v in head)
    g_tail = sum(abs(p[v] - q[v]) for v in range(len(p)) if v not in head)
    todi = sum(pi / (1 + qi / pi) for pi, qi in zip(p, q) if pi > 0)  # p * sigmoid(log p - log q)
    return {
        "fkl": fkl,
        "rkl": rkl,
        "teacher_entropy": h_p,
        "student_entropy": h_q,
        "head_gap": g_head,
        "tail_gap": g_tail,
        "top1_agreement": float(max(range(len(p)), key=lambda v: p[v]) == max(range(len(q)), key=lambda v: q[v])),
        "teacher_confidence": max(p),
        "todi_alpha": todi,
    }


@pytest.mark.parametrize("temperature,mu", [(1.0, 0.5), (2.0, 0.3), (0.7, 1.0)])
def test_token_statistics_match_naive_reference(temperature, mu):
    g = torch.Generator().manual_seed(0)
    s = 2 * torch.randn(2, 3, 7, generator=g)
    t = 2 * torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    f = compute_features(s, t, mask, temperature=temperature, mu=mu)
    for b in range(2):
        for i in range(3):
            ref = naive_token_stats(s[b, i].tolist(), t[b, i].tolist(), temperature, mu)
            for name, value in ref.items():
                got = float(getattr(f, name)[b, i])
                if mask[b, i]:
                    assert got == pytest.approx(value, rel=1e-4, abs=1e-5), (name, b, i)
                else:
                    assert got == 0.0, name


def test_views_are_masked_means():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    f = compute_features(s, t, mask)
    tok = f.token()
    assert tok.shape == (3, 4, len(FEATURE_NAMES))
    seq, counts = f.sequence()
    assert counts.tolist() == [2, 0, 4]
    torch.testing.assert_close(seq[0], tok[0, :2].mean(0))
    torch.testing.assert_close(seq[1], torch.zeros(len(FEATURE_NAMES)))
    torch.testing.assert_close(seq[2], tok[2].mean(0))
    torch.testing.assert_close(f.batch(), tok[mask].mean(0))
    assert f.fkl_mean == pytest.approx(float(f.fkl[mask].mean()))
    assert f.rkl_mean == pytest.approx(float(f.rkl[mask].mean()))


def test_no_counted_token_gives_zeros_not_nan():
    f = compute_features(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(f.batch(), torch.zeros(len(FEATURE_NAMES)))
    assert f.fkl.abs().sum() == 0


def test_identical_distributions_and_closed_forms():
    t = torch.randn(1, 5, 9)
    f = compute_features(t.clone(), t)
    torch.testing.assert_close(f.fkl, torch.zeros(1, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(f.rkl, torch.zeros(1, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(f.teacher_entropy, f.student_entropy)
    assert torch.all(f.top1_agreement == 1)
    torch.testing.assert_close(f.todi_alpha, torch.full((1, 5), 0.5))  # sigmoid(0) = 1/2
    torch.testing.assert_close(f.akl_alpha(), torch.full((1, 5), 0.5))  # both gaps 0
    # uniform teacher: entropy log V, confidence 1 / V
    u = compute_features(torch.randn(1, 2, 9), torch.zeros(1, 2, 9))
    torch.testing.assert_close(u.teacher_entropy, torch.full((1, 2), math.log(9)))
    torch.testing.assert_close(u.teacher_confidence, torch.full((1, 2), 1 / 9))


def test_minus_inf_logits_never_give_nan():
    s, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    s[..., -2:] = -math.inf  # padded vocabulary on both sides
    t[..., -2:] = -math.inf
    f = compute_features(s, t)
    for name in FEATURE_NAMES + ("todi_alpha",):
        assert torch.isfinite(getattr(f, name)).all(), name
    ref = compute_features(s[..., :-2], t[..., :-2])
    for name in FEATURE_NAMES:
        torch.testing.assert_close(getattr(f, name), getattr(ref, name), rtol=1e-5, atol=1e-6)


def test_half_precision_input_is_computed_in_fp32_without_autograd():
    s = torch.randn(2, 3, 8, requires_grad=True)
    t = torch.randn(2, 3, 8)
    f = compute_features(s.bfloat16(), t.bfloat16())
    ref = compute_features(s.detach().bfloat16().float(), t.bfloat16().float())
    assert f.fkl.dtype == torch.float32 and not f.fkl.requires_grad
    torch.testing.assert_close(f.fkl, ref.fkl)
    assert not compute_features(s, t).rkl.requires_grad


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="must be \\[B, T, V\\]"):
        compute_features(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="teacher_logits shape"):
        compute_features(torch.randn(1, 3, 4), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="mask shape"):
        compute_features(torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        compute_features(torch.randn(1, 3, 4), torch.randn(1, 3, 4), temperature=0.0)
    with pytest.raises(ValueError, match="mu"):
        compute_features(torch.randn(1, 3, 4), torch.randn(1, 3, 4), mu=0.0)


def test_running_norm_pools_exact_moments_then_tracks():
    g = torch.Generator().manual_seed(2)
    rows = [3.0 + 2.0 * torch.randn(n, 4, generator=g) for n in (5, 1, 9, 3)]
    norm = RunningNorm(4, momentum=0.99)  # cumulative for the first 100 rows
    for r in rows:
        norm.update(r)
    all_rows = torch.cat(rows).double()
    torch.testing.assert_close(norm.mean, all_rows.mean(0))
    torch.testing.assert_close(norm.var, all_rows.var(0, unbiased=False))
    x = torch.randn(6, 4)
    expected = ((x.double() - all_rows.mean(0)) / (all_rows.var(0, unbiased=False) + norm.eps).sqrt()).float()
    torch.testing.assert_close(norm(x), expected.clamp(-5, 5))
    # moving-average phase: a shifted distribution is tracked
    fast = RunningNorm(1, momentum=0.5)
    for _ in range(30):
        fast.update(torch.full((2, 1), 10.0))
    fast.update(torch.full((2, 1), 20.0))
    assert float(fast.mean) == pytest.approx(15.0, rel=0.05)
    clone = RunningNorm(4)
    clone.load_state_dict(norm.state_dict())
    torch.testing.assert_close(clone(x), norm(x))
    # constant features: variance 0, normalised to 0 instead of inf
    const = RunningNorm(2)
    const.update(torch.ones(4, 2))
    assert torch.equal(const(torch.ones(1, 2)), torch.zeros(1, 2))


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_chunked_rows_give_the_same_statistics(chunk_size):
    g = torch.Generator().manual_seed(5)
    s, t = 2 * torch.randn(3, 6, 11, generator=g), 2 * torch.randn(3, 6, 11, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.3
    whole = compute_features(s, t, mask, chunk_size=10_000)
    parts = compute_features(s, t, mask, chunk_size=chunk_size)
    for name in (*FEATURE_NAMES, "todi_alpha"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="chunk_size"):
        compute_features(s, t, mask, chunk_size=0)


@pytest.mark.parametrize("flatness", [0.05, 1.0, 4.0])
def test_head_and_tail_gaps_from_top_k_equal_a_full_sort(flatness):
    """V = 1000: a flat teacher's head (mass 0.5) spans hundreds of tokens, past the first top-64, so the top-k is
    widened; a peaked one ends within it. Both equal AKL's gaps from a full descending sort."""
    g = torch.Generator().manual_seed(7)
    t = torch.randn(2, 4, 1000, generator=g) * flatness
    s = torch.randn(2, 4, 1000, generator=g)
    f = compute_features(s, t, mu=0.5)
    p, q = torch.softmax(t, -1).reshape(-1, 1000), torch.softmax(s, -1).reshape(-1, 1000)
    sorted_p, order = p.sort(-1, descending=True)
    gap = (sorted_p - q.gather(-1, order)).abs()
    head = sorted_p.cumsum(-1) <= 0.5
    head[:, 0] = True
    torch.testing.assert_close(f.head_gap.reshape(-1), (gap * head).sum(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.tail_gap.reshape(-1), (gap * ~head).sum(-1), rtol=1e-4, atol=1e-5)
    if flatness == 0.05:
        assert int(head.sum(-1).min()) > 64  # the widened path was exercised


def test_features_from_hidden_states_equal_the_features_of_the_full_logits():
    from arkd.policy import compute_features_from_hidden

    g = torch.Generator().manual_seed(9)
    hidden, weight, bias = (
        torch.randn(2, 5, 6, generator=g),
        torch.randn(13, 6, generator=g),
        torch.randn(13, generator=g),
    )
    teacher = 2 * torch.randn(2, 5, 13, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    full = compute_features(hidden @ weight.T + bias, teacher, mask, mu=0.4)
    light = compute_features_from_hidden(hidden, weight, teacher, mask, bias=bias, mu=0.4, chunk_size=3)
    for name in (*FEATURE_NAMES, "todi_alpha"):
        torch.testing.assert_close(getattr(light, name), getattr(full, name), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \[V, H\]"):
        compute_features_from_hidden(hidden, weight[:, :5], teacher, mask)


def test_on_policy_share_reaches_the_features_with_a_top_k_teacher():
    from arkd.losses.topk import TopKTeacher

    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    share = torch.tensor([1.0, 0.25])
    full = compute_features(s, t, mask, on_policy=share)
    top = compute_features(s, TopKTeacher.from_logits(t, 3), mask, on_policy=share)
    expected = torch.where(mask, share[:, None].expand(2, 4), 0.0)  # each sequence's share on its counted tokens
    torch.testing.assert_close(full.on_policy, expected)
    torch.testing.assert_close(top.on_policy, expected)
