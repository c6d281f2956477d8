"""The fast bidirectional KL paths against the naive autograd composition, gradcheck and memory behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import arkd.losses as L
from arkd.losses import fused
from arkd.losses.fused import _compiled, _rows
from arkd.losses.fused import linear as fused_linear

SHAPE = (3, 47, 123)


def _logits(shape=SHAPE, seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)
    return s, t


def naive_bidirectional(s, t, mask, alpha, temperature, reduction):
    """Two log_softmax and two F.kl_div under autograd: the reference the fast path replaces."""
    log_q = TF.log_softmax(s.double() / temperature, -1)
    log_p = TF.log_softmax(t.double() / temperature, -1)
    fkl = TF.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    rkl = TF.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    values = alpha * fkl + (1 - alpha) * rkl
    if mask is not None:
        values = values * mask
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    count = values.numel() if mask is None else mask.sum().clamp(min=1)
    return values.sum() / count


def _alpha(kind: str):
    g = torch.Generator().manual_seed(9)
    return {
        "scalar": 0.3,
        "batch": torch.tensor(0.8, dtype=torch.float64),
        "sequence": torch.rand(3, generator=g, dtype=torch.float64),
        "sequence_column": torch.rand(3, 1, generator=g, dtype=torch.float64),
        "token": torch.rand(3, 47, generator=g, dtype=torch.float64),
    }[kind]


def _expand_alpha(alpha):
    if not torch.is_tensor(alpha):
        return alpha
    return alpha.reshape(tuple(alpha.shape) + (1,) * (2 - alpha.dim()))


@pytest.mark.parametrize("alpha_kind", ["scalar", "batch", "sequence", "sequence_column", "token"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_path_equals_naive_composition(alpha_kind, reduction, masked):
    s, t = _logits(seed=1)
    mask = (torch.rand(SHAPE[:-1], generator=torch.Generator().manual_seed(2)) < 0.6) if masked else None
    alpha = _alpha(alpha_kind)
    temperature = 1.7 if masked else 1.0
    got = L.bidirectional_kl(s, t, mask, alpha=alpha, temperature=temperature, reduction=reduction, chunk_size=13)
    ref = naive_bidirectional(s, t, mask, _expand_alpha(alpha), temperature, reduction)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # a non-uniform upstream gradient for reduction="none"; a scalar otherwise
    upstream = torch.rand(got.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g_got = torch.autograd.grad(got, (s, t), upstream)
    g_ref = torch.autograd.grad(ref, (s, t), upstream)
    torch.testing.assert_close(g_got[0], g_ref[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_got[1], g_ref[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, 141, 10_000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    s, t = _logits(seed=4)
    mask = torch.rand(SHAPE[:-1], generator=torch.Generator().manual_seed(5)) < 0.5
    got = L.bidirectional_kl(s, t, mask, alpha=0.4, reduction="sum", chunk_size=chunk_size)
    ref = naive_bidirectional(s, t, mask, 0.4, 1.0, "sum")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(ref, s)[0])


@pytest.mark.parametrize("layout", ["shifted", "transposed"])
def test_non_contiguous_logits(layout):
    # the trainer passes logits[:, :-1]: read chunk by chunk, never flattened by a full copy
    s_full, t_full = _logits((3, 48, 123), seed=30)
    if layout == "shifted":
        s, t = s_full[:, :-1], t_full[:, :-1]
    else:
        s, t = s_full[:, :47].transpose(0, 1), t_full[:, :47].transpose(0, 1)
    assert not s.is_contiguous()
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(31)) < 0.6
    alpha = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    for m in (None, mask):
        got = L.bidirectional_kl(s, t, m, alpha=alpha, reduction="none", chunk_size=10)
        ref = naive_bidirectional(s, t, m, alpha, 1.0, "none")
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        upstream = torch.rand(got.shape, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
        g_got = torch.autograd.grad(got, (s_full, t_full), upstream)
        g_ref = torch.autograd.grad(ref, (s_full, t_full), upstream)
        torch.testing.assert_close(g_got[0], g_ref[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_got[1], g_ref[1], rtol=1e-9, atol=1e-12)


def test_gradcheck_bidirectional_function_float64():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    alpha = torch.rand(6, dtype=torch.float64, generator=g)
    mask = torch.rand(6, generator=g) < 0.7
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda a, b, m=m: fused.BidirectionalKLFunction.apply(a, b, alpha, m, 1.7, 4, False)[0], (s, t)
        )
        # fast mode exercises a random projection of the full Jacobian (incl. the in-place path's maths)
        assert torch.autograd.gradcheck(
            lambda a, b, m=m: fused.BidirectionalKLFunction.apply(a, b, alpha, m, 1.7, 4, False)[0],
            (s, t),
            fast_mode=True,
        )


def test_gradcheck_fused_linear_function_float64():
    g = torch.Generator().manual_seed(7)
    n, h, v = 5, 4, 9
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(n, v, dtype=torch.float64, generator=g)
    alpha = torch.rand(n, dtype=torch.float64, generator=g)
    mask = torch.rand(n, generator=g) < 0.7
    token_weight = torch.rand(n, dtype=torch.float64, generator=g)
    for m in (None, mask):

        def fn(hd, w, b, m=m):
            return fused.FusedLinearBidirectionalKLFunction.apply(
                hd, w, b, teacher, None, None, None, alpha, token_weight, m, 1.3, 3
            )

        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_alpha_is_a_constant():
    s, t = _logits((2, 5, 9), seed=8)
    alpha = torch.full((2,), 0.25, dtype=torch.float64, requires_grad=True)
    loss = L.bidirectional_kl(s, t, alpha=alpha)
    loss.backward()
    assert alpha.grad is None
    assert s.grad is not None


def test_frozen_teacher_gets_no_buffer_and_second_backward_is_refused():
    s, _ = _logits((2, 5, 9), seed=10)
    t = torch.randn(2, 5, 9, dtype=torch.float64)  # frozen teacher: no grad requested
    loss = L.bidirectional_kl(s, t, alpha=0.5)
    grad_fn = loss.grad_fn
    while not isinstance(getattr(grad_fn, "_forward_cls", None), type) or not issubclass(
        grad_fn._forward_cls, fused.BidirectionalKLFunction
    ):
        grad_fn = grad_fn.next_functions[0][0]
    assert grad_fn.saved_tensors[1] is None  # no teacher gradient buffer
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_return_components_are_fkl_and_rkl():
    s, t = _logits(seed=11)
    mask = torch.rand(SHAPE[:-1], generator=torch.Generator().manual_seed(12)) < 0.5
    loss, fkl, rkl = L.bidirectional_kl(s, t, mask, alpha=0.2, return_components=True, temperature=2.0)
    torch.testing.assert_close(fkl, L.forward_kl(s, t, mask, temperature=2.0).detach())
    torch.testing.assert_close(rkl, L.reverse_kl(s, t, mask, temperature=2.0).detach())
    torch.testing.assert_close(loss.detach(), 0.2 * fkl + 0.8 * rkl)
    assert not fkl.requires_grad and not rkl.requires_grad


def test_shared_neg_inf_and_all_masked_rows():
    s, t = _logits(seed=13)
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    banned = torch.zeros(SHAPE, dtype=torch.bool)
    banned[..., -7:] = True
    s_inf, t_inf = torch.where(banned, ninf, s), torch.where(banned, ninf, t)
    # an uncounted token whose logits are all -inf (undefined distribution) must not poison anything
    s_inf = s_inf.clone()
    s_inf[1, 2] = float("-inf")
    t_inf = t_inf.clone()
    t_inf[1, 2] = float("-inf")
    mask = torch.ones(SHAPE[:-1], dtype=torch.bool)
    mask[1, 2] = False
    got = L.bidirectional_kl(s_inf, t_inf, mask, alpha=_alpha("token"), reduction="sum")
    ref = naive_bidirectional(s[..., :-7], t[..., :-7], mask, _alpha("token"), 1.0, "sum")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    gs, gt = torch.autograd.grad(got, (s, t))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gs[banned] == 0) and torch.all(gs[1, 2] == 0)
    rs, rt = torch.autograd.grad(ref, (s, t))
    torch.testing.assert_close(gs[..., :-7], rs[..., :-7])
    # nothing counted
    nothing = torch.zeros(SHAPE[:-1], dtype=torch.bool)
    loss = L.bidirectional_kl(s, t, nothing)
    assert loss.item() == 0.0
    assert torch.all(torch.autograd.grad(loss, s)[0] == 0)


def test_student_neg_inf_where_teacher_has_mass_gives_inf_fkl_but_finite_rkl_gradient():
    s, t = _logits((1, 2, 6), seed=14)
    s2 = s.detach().clone()
    s2[0, 0, 0] = float("-inf")
    s2.requires_grad_(True)
    loss, fkl, _ = L.bidirectional_kl(s2, t.detach(), alpha=0.0, reduction="none", return_components=True)
    assert fkl[0, 0].item() == float("inf")
    torch.testing.assert_close(loss, L.reverse_kl(s2, t.detach(), reduction="none"))
    assert torch.isfinite(torch.autograd.grad(loss.sum(), s2)[0]).all()
    # symmetric case: the teacher gives -inf where the student has mass; alpha = 1 is plain FKL
    t2 = t.detach().clone()
    t2[0, 1, 2] = float("-inf")
    t2.requires_grad_(True)
    s3 = s.detach().clone().requires_grad_(True)
    loss = L.bidirectional_kl(s3, t2, alpha=1.0, reduction="none")
    torch.testing.assert_close(loss, L.forward_kl(s3, t2, reduction="none"))
    gs, gt = torch.autograd.grad(loss.sum(), (s3, t2))
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    # an interior alpha mixes in the infinite divergence: +inf, never NaN
    mixed = L.bidirectional_kl(s2, t.detach(), alpha=0.5, reduction="none")
    assert mixed[0, 0].item() == float("inf") and not torch.isnan(mixed).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    s, t = _logits((4, 19, 257), seed=15, dtype=dtype)
    alpha = torch.rand(4, 19, generator=torch.Generator().manual_seed(1))
    got = L.bidirectional_kl(s, t, alpha=alpha, reduction="sum", chunk_size=10)
    assert got.dtype == torch.float32
    ref = naive_bidirectional(s.detach().float().requires_grad_(True), t.detach().float(), None, alpha, 1.0, "sum")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    gs = torch.autograd.grad(got, s)[0]
    assert gs.dtype == dtype
    s32 = s.detach().float().requires_grad_(True)
    ref32 = naive_bidirectional(s32, t.detach().float(), None, alpha, 1.0, "sum")
    g_ref = torch.autograd.grad(ref32, s32)[0]
    torch.testing.assert_close(gs.float(), g_ref.float(), rtol=2e-2, atol=2e-3)


def test_default_chunk_size():
    assert fused.default_chunk_size(50257, "cpu") == 2**24 // 50257 == 333
    assert fused.default_chunk_size(151936, "cuda") == 2**25 // 151936
    assert fused.default_chunk_size(10**9, "cpu") == 1
    s, t = _logits((2, 3, 5))
    torch.testing.assert_close(L.bidirectional_kl(s, t, chunk_size=None), L.bidirectional_kl(s, t, chunk_size=1))


def test_alpha_and_chunk_size_validation():
    s, t = _logits((2, 3, 5))
    with pytest.raises(ValueError, match="alpha"):
        L.bidirectional_kl(s, t, alpha=torch.rand(3))  # [3] does not align with the leading dimension 2
    with pytest.raises(ValueError, match="alpha"):
        L.bidirectional_kl(s, t, alpha=torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        L.bidirectional_kl(s, t, chunk_size=0)


# ------------------------------------------------------------------------------------------------- fused linear
def _hidden_case(seed=20, shape=(2, 13), h=8, v=37, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=dtype, requires_grad=True)
    t_hidden = torch.randn(*shape, h + 3, generator=g, dtype=dtype)
    t_weight = torch.randn(v, h + 3, generator=g, dtype=dtype)
    t_bias = torch.randn(v, generator=g, dtype=dtype)
    return hidden, weight, bias, t_hidden, t_weight, t_bias


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("teacher_from_hidden", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_fused_linear_equals_logits_path(reduction, teacher_from_hidden, chunk_size):
    hidden, weight, bias, t_hidden, t_weight, t_bias = _hidden_case()
    mask = torch.rand(2, 13, generator=torch.Generator().manual_seed(21)) < 0.7
    alpha = torch.rand(2, 13, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    t_logits = t_hidden @ t_weight.T + t_bias
    teacher = (
        {"teacher_hidden": t_hidden, "teacher_weight": t_weight, "teacher_bias": t_bias}
        if teacher_from_hidden
        else {"teacher_logits": t_logits}
    )
    got = L.fused_linear_bidirectional_kl(
        hidden,
        weight,
        mask=mask,
        student_bias=bias,
        alpha=alpha,
        temperature=1.5,
        reduction=reduction,
        chunk_size=chunk_size,
        **teacher,
    )
    ref = naive_bidirectional(hidden @ weight.T + bias, t_logits, mask, alpha, 1.5, reduction)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got * 1.7, (hidden, weight, bias))
    g_ref = torch.autograd.grad(ref * 1.7, (hidden, weight, bias))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_linear_never_materialises_all_logits(monkeypatch):
    hidden, weight, _, _, _, _ = _hidden_case(shape=(4, 50), v=101)
    teacher = torch.randn(4, 50, 101, dtype=torch.float64)
    mask = torch.rand(4, 50, generator=torch.Generator().manual_seed(23)) < 0.5
    rows = []
    real = fused_linear._chunk_bidirectional

    def spy(student, *args, **kwargs):
        rows.append(student.shape[0])
        return real(student, *args, **kwargs)

    monkeypatch.setattr(fused_linear, "_chunk_bidirectional", spy)
    loss = L.fused_linear_bidirectional_kl(hidden, weight, teacher, mask, chunk_size=16)
    loss.backward()
    assert max(rows) <= 16  # at most one chunk of logits exists at a time
    assert sum(rows) == int(mask.sum())  # uncounted tokens are never computed
    assert hidden.grad is not None and torch.all(hidden.grad[~mask] == 0)


def test_fused_linear_teacher_is_detached_and_validation():
    hidden, weight, bias, t_hidden, t_weight, _ = _hidden_case()
    t_weight.requires_grad_(True)
    loss = L.fused_linear_bidirectional_kl(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight)
    loss.backward()
    assert t_weight.grad is None
    t_logits = torch.randn(2, 13, 36, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"37.*36"):
        L.fused_linear_bidirectional_kl(hidden, weight, t_logits)
    with pytest.raises(ValueError, match="teacher"):
        L.fused_linear_bidirectional_kl(hidden, weight)
    with pytest.raises(ValueError, match="none"):
        L.fused_linear_bidirectional_kl(hidden, weight, torch.randn(2, 13, 37), reduction="none")
    with pytest.raises(ValueError, match="student_weight"):
        L.fused_linear_bidirectional_kl(hidden, weight[:, :5], torch.randn(2, 13, 37))


def test_fused_linear_all_masked_and_bf16():
    hidden, weight, _, _, _, _ = _hidden_case(dtype=torch.float32)
    teacher = torch.randn(2, 13, 37)
    loss = L.fused_linear_bidirectional_kl(hidden, weight, teacher, torch.zeros(2, 13, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
    hb = hidden.detach().bfloat16().requires_grad_(True)
    wb = weight.detach().bfloat16().requires_grad_(True)
    got = L.fused_linear_bidirectional_kl(hb, wb, teacher.bfloat16(), alpha=0.7)
    ref = L.bidirectional_kl(hb.float() @ wb.float().T, teacher.bfloat16().float(), alpha=0.7)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ non-finite values
def _nan_case(where: str):
    s, t = _logits((2, 9, 31), seed=40)
    s, t = s.detach().clone(), t.detach().clone()
    (s if where == "student" else t)[1, 4, 7] = float("nan")
    return s.requires_grad_(True), t.requires_grad_(True)


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nan_logit_gives_nan_loss_and_gradient_like_the_naive_composition(where, reduction):
    s, t = _nan_case(where)
    got = L.bidirectional_kl(s, t, alpha=0.3, reduction=reduction, chunk_size=4, compiled=False)
    ref = naive_bidirectional(s, t, None, 0.3, 1.0, reduction)
    assert torch.isnan(ref).any()  # the reference the fast path must not beat at hiding it
    if reduction == "none":
        assert torch.isnan(got[1, 4]) and torch.isfinite(got[0]).all()
        torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
    else:
        assert torch.isnan(got)
    gs, gt = torch.autograd.grad(got.sum(), (s, t))
    assert torch.isnan(gs[1, 4]).all() and torch.isnan(gt[1, 4]).all()
    assert torch.isfinite(gs[0]).all()  # other tokens' gradients are untouched


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_nan_survives_alpha_at_the_ends_and_inf_logit_is_nan(alpha):
    s, t = _nan_case("student")
    assert torch.isnan(L.bidirectional_kl(s, t, alpha=alpha, compiled=False))
    s2 = s.detach().clone()
    s2[1, 4, 7] = float("inf")  # +inf logit: the naive composition gives NaN too
    assert torch.isnan(naive_bidirectional(s2, t, None, 0.5, 1.0, "mean"))
    assert torch.isnan(L.bidirectional_kl(s2, t, alpha=0.5, compiled=False))


def test_nan_in_an_uncounted_token_does_not_leak():
    s, t = _nan_case("student")
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4] = False
    got = L.bidirectional_kl(s, t, mask, alpha=0.3, compiled=False)
    assert torch.isfinite(got)
    assert torch.isfinite(torch.autograd.grad(got, s)[0]).all()


@pytest.mark.parametrize("where", ["hidden", "teacher"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fused_linear_nan_gives_nan_loss(where, reduction):
    hidden, weight, _, _, _, _ = _hidden_case()
    teacher = torch.randn(2, 13, 37, dtype=torch.float64)
    if where == "hidden":
        hidden = hidden.detach().clone()
        hidden[1, 3, 2] = float("nan")
        hidden.requires_grad_(True)
    else:
        teacher[1, 3, 5] = float("nan")
    loss = L.fused_linear_bidirectional_kl(hidden, weight, teacher, alpha=0.4, reduction=reduction, chunk_size=5)
    assert torch.isnan(loss)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert torch.isnan(gh[1, 3]).all() and torch.isnan(gw).any()


# ---------------------------------------------------------------------------------------- compile switch, layout
def test_compile_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(fused.COMPILE_ENV, raising=False)
    assert fused.compile_enabled(None, fused.COMPILE_MIN_ELEMENTS, cpu)
    assert not fused.compile_enabled(None, fused.COMPILE_MIN_ELEMENTS - 1, cpu)
    assert not fused.compile_enabled(False, 10**9, cpu)
    assert fused.compile_enabled(True, 1, cpu)
    assert not fused.compile_enabled(True, 10**9, torch.device("meta"))
    monkeypatch.setenv(fused.COMPILE_ENV, "0")
    assert not fused.compile_enabled(None, 10**9, cpu)
    monkeypatch.setenv(fused.COMPILE_ENV, "1")
    assert fused.compile_enabled(None, 1, cpu)
    monkeypatch.setenv(fused.COMPILE_ENV, "sometimes")
    with pytest.raises(ValueError, match="ARKD_COMPILE_LOSS must be 0, 1 or auto"):
        fused.compile_enabled(None, 1, cpu)
    s, t = _logits((2, 3, 5))
    with pytest.raises(ValueError, match="compiled must be True, False or None"):
        L.bidirectional_kl(s, t, compiled="yes")


@pytest.mark.parametrize("layout", ["flat", "shifted", "transposed", "truncated_vocab"])
def test_row_layout_views_rows_without_copying(layout):
    full = torch.randn(3, 8, 11, dtype=torch.float64)
    x = {
        "flat": full,
        "shifted": full[:, :-1],
        "transposed": full[:, :5].transpose(0, 1),
        "truncated_vocab": full[..., :9],
    }[layout]
    rows = _rows._RowLayout.of(x)
    assert rows is not None and rows.base.data_ptr() == x.data_ptr()
    flat = x.reshape(-1, x.shape[-1])
    got = rows.base if rows.rows is None else rows.base[rows.rows]
    torch.testing.assert_close(got, flat, rtol=0, atol=0)
    grad_rows = torch.arange(rows.base.shape[0] * x.shape[-1], dtype=torch.float64).view(-1, x.shape[-1])
    expected = grad_rows if rows.rows is None else grad_rows[rows.rows]
    torch.testing.assert_close(rows.grad_view(grad_rows, x).reshape(-1, x.shape[-1]), expected, rtol=0, atol=0)
    assert _rows._RowLayout.of(torch.randn(4, 1).expand(4, 6)) is None  # overlapping rows: the eager path


def test_failed_compilation_warns_once_and_falls_back_to_the_eager_path(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(_compiled, "_STATE", _compiled._CompileState())  # no kernel compiled, no failure yet
    s, t = _logits(seed=41)
    with pytest.warns(RuntimeWarning, match="torch.compile of the bidirectional KL kernel failed.*no C\\+\\+ compiler"):
        got = L.bidirectional_kl(s, t, alpha=0.3, compiled=True)
    ref = naive_bidirectional(s, t, None, 0.3, 1.0, "mean")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(ref, s)[0])
    assert _compiled._STATE.failures and not fused.compile_enabled(True, 10**9, torch.device("cpu"))


# ------------------------------------------------------------------------------------------- the compiled path
# Each distinct kernel compiles once per process (a few seconds on a loaded 2-core machine): the shapes, dtypes and
# temperatures below are shared so that these tests compile as few kernels as possible.
V_COMPILED = 61


def _compiled_case(shape=(3, 11), seed=50, dtype=torch.float64):
    s_full, t_full = _logits((*shape[:-1], shape[-1] + 1, V_COMPILED), seed=seed, dtype=dtype)
    return s_full, t_full


def test_compiled_path_equals_naive_and_never_recompiles():
    import torch._dynamo.utils as dynamo_utils

    graphs = []
    for tokens in (11, 5, 23):  # odd token counts; the row count is dynamic: one compilation serves all of them
        s_full, t_full = _compiled_case((3, tokens), seed=tokens)
        alpha = torch.rand(3, tokens, generator=torch.Generator().manual_seed(tokens), dtype=torch.float64)
        mask = torch.rand(3, tokens, generator=torch.Generator().manual_seed(1 + tokens)) < 0.6
        for s, t, m in ((s_full, t_full, None), (s_full[:, :-1], t_full[:, :-1], mask)):  # direct, then indexed
            if m is None:
                s, t = s[:, :tokens], t[:, :tokens]
            got = L.bidirectional_kl(s, t, m, alpha=alpha, temperature=1.7, reduction="none", compiled=True)
            ref = naive_bidirectional(s, t, m, alpha, 1.7, "none")
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
            upstream = torch.rand(got.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            g_got = torch.autograd.grad(got, (s_full,), upstream)[0]
            g_ref = torch.autograd.grad(ref, (s_full,), upstream)[0]
            torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12)
            with torch.no_grad():  # values only (the reward, validation): the same forward kernel
                again = L.bidirectional_kl(
                    s.detach(), t, m, alpha=alpha, temperature=1.7, reduction="none", compiled=True
                )
            torch.testing.assert_close(again, got.detach(), rtol=0, atol=0)
        graphs.append((len(fused.compiled_kernels()), dynamo_utils.counters["stats"]["unique_graphs"]))
    s_full, t_full = _compiled_case((1, 29), seed=7)
    for m in (torch.ones(1, 29, dtype=torch.bool), torch.arange(29).view(1, 29) % 3 > 0):  # all counted, then not
        got = L.bidirectional_kl(s_full[:, :-1], t_full[:, :-1], m, alpha=0.4, temperature=1.7, compiled=True)
        got.backward()
    graphs.append((len(fused.compiled_kernels()), dynamo_utils.counters["stats"]["unique_graphs"]))
    assert graphs[0] == graphs[1] == graphs[2] == graphs[3], graphs  # nothing compiled after the first token count


@pytest.mark.slow
@pytest.mark.parametrize("alpha_kind", ["scalar", "batch", "sequence", "sequence_column", "token", "zero", "one"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_path_every_alpha_granularity(alpha_kind, reduction, masked):
    s_full, t_full = _compiled_case((3, 47), seed=51)
    s, t = s_full[:, :-1], t_full[:, :-1]  # the trainer's layout
    g = torch.Generator().manual_seed(52)
    alpha = {
        "scalar": 0.3,
        "batch": torch.tensor(0.8, dtype=torch.float64),
        "sequence": torch.rand(3, generator=g, dtype=torch.float64),
        "sequence_column": torch.rand(3, 1, generator=g, dtype=torch.float64),
        "token": torch.rand(3, 47, generator=g, dtype=torch.float64),
        "zero": 0.0,  # plain RKL: the FKL gradient is skipped
        "one": torch.ones(3, 47, dtype=torch.float64),  # plain FKL: the RKL gradient is skipped
    }[alpha_kind]
    mask = (torch.rand(3, 47, generator=g) < 0.6) if masked else None
    got = L.bidirectional_kl(s, t, mask, alpha=alpha, temperature=1.7, reduction=reduction, compiled=True)
    ref = naive_bidirectional(s, t, mask, _expand_alpha(alpha), 1.7, reduction)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.rand(got.shape, generator=g, dtype=torch.float64)
    g_got = torch.autograd.grad(got, (s_full, t_full), upstream)
    g_ref = torch.autograd.grad(ref, (s_full, t_full), upstream)
    torch.testing.assert_close(g_got[0], g_ref[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g_got[1], g_ref[1], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_compiled_path_infinities_nan_and_components():
    s_full, t_full = _compiled_case((3, 47), seed=53)
    s, t = s_full.detach()[:, :-1].clone(), t_full.detach()[:, :-1].clone()
    # shared -inf entries stay finite; the student's -inf where the teacher has mass is an infinite FKL
    s[..., -5:] = t[..., -5:] = float("-inf")
    s[0, 0, 0] = float("-inf")
    s.requires_grad_(True)
    loss, fkl, rkl = L.bidirectional_kl(
        s, t, alpha=0.0, reduction="none", return_components=True, temperature=1.7, compiled=True
    )
    assert fkl[0, 0].item() == float("inf") and torch.isfinite(rkl).all()
    torch.testing.assert_close(loss, L.reverse_kl(s, t, reduction="none", temperature=1.7))
    assert torch.isfinite(torch.autograd.grad(loss.sum(), s)[0]).all()
    mixed = L.bidirectional_kl(s, t, alpha=0.5, reduction="none", temperature=1.7, compiled=True)
    assert mixed[0, 0].item() == float("inf") and not torch.isnan(mixed).any()
    # NaN propagates on every reduction and into the gradient; not from an uncounted token
    s2 = s.detach().clone()
    s2[1, 4, 7] = float("nan")
    s2.requires_grad_(True)
    for reduction in ("none", "sum", "mean"):
        got = L.bidirectional_kl(s2, t, alpha=0.3, reduction=reduction, temperature=1.7, compiled=True)
        assert torch.isnan(got).any() if reduction == "none" else torch.isnan(got)
    got = L.bidirectional_kl(s2, t, alpha=0.3, temperature=1.7, compiled=True)
    grad = torch.autograd.grad(got, s2)[0]
    assert torch.isnan(grad[1, 4]).all() and torch.isfinite(grad[0, 1:]).all()
    mask = torch.ones(3, 47, dtype=torch.bool)
    mask[1, 4] = mask[0, 0] = False  # the NaN token and the infinite-FKL token
    got = L.bidirectional_kl(s2, t, mask, alpha=0.3, temperature=1.7, compiled=True)
    assert torch.isfinite(got) and torch.isfinite(torch.autograd.grad(got, s2)[0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_path_half_precision_inputs(dtype):
    s, t = _logits((4, 19, V_COMPILED), seed=54, dtype=dtype)
    alpha = torch.rand(4, 19, generator=torch.Generator().manual_seed(1))
    got = L.bidirectional_kl(s, t, alpha=alpha, reduction="sum", compiled=True)
    assert got.dtype == torch.float32
    s32 = s.detach().float().requires_grad_(True)
    ref = naive_bidirectional(s32, t.detach().float(), None, alpha, 1.0, "sum")
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    gs = torch.autograd.grad(got, s)[0]
    assert gs.dtype == dtype
    torch.testing.assert_close(gs.float(), torch.autograd.grad(ref, s32)[0].float(), rtol=2e-2, atol=2e-3)


@pytest.mark.slow
def test_compiled_path_gradcheck_float64():
    g = torch.Generator().manual_seed(55)
    s = torch.randn(6, V_COMPILED, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(6, V_COMPILED, dtype=torch.float64, generator=g, requires_grad=True)
    alpha = torch.rand(6, dtype=torch.float64, generator=g)
    mask = torch.rand(6, generator=g) < 0.7
    for m in (None, mask):
        assert torch.autograd.gradcheck(
            lambda a, b, m=m: fused.BidirectionalKLFunction.apply(a, b, alpha, m, 1.7, 4, False, True)[0],
            (s, t),
            fast_mode=True,
        )


@pytest.mark.slow
@pytest.mark.parametrize("teacher_from_hidden", [False, True])
@pytest.mark.parametrize("alpha", ["token", "one"])
def test_compiled_fused_linear_equals_logits_path(teacher_from_hidden, alpha):
    hidden, weight, bias, t_hidden, t_weight, t_bias = _hidden_case(shape=(3, 11), v=V_COMPILED)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(56)) < 0.7
    alpha = torch.rand(3, 11, dtype=torch.float64) if alpha == "token" else 1.0
    t_logits = t_hidden @ t_weight.T + t_bias
    teacher = (
        {"teacher_hidden": t_hidden, "teacher_weight": t_weight, "teacher_bias": t_bias}
        if teacher_from_hidden
        else {"teacher_logits": t_logits}
    )
    for m, chunk_size in ((None, 8), (mask, 5)):  # last chunks of 1 row (33 = 4 x 8 + 1) and of 3 rows
        got = L.fused_linear_bidirectional_kl(
            hidden, weight, mask=m, student_bias=bias, alpha=alpha, temperature=1.7, chunk_size=chunk_size,
            compiled=True, **teacher,
        )  # fmt: skip
        ref = naive_bidirectional(hidden @ weight.T + bias, t_logits, m, alpha, 1.7, "mean")
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        g_got = torch.autograd.grad(got * 1.7, (hidden, weight, bias))
        g_ref = torch.autograd.grad(ref * 1.7, (hidden, weight, bias))
        for a, b in zip(g_got, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    nan_hidden = hidden.detach().clone()
    nan_hidden[1, 3, 2] = float("nan")
    assert torch.isnan(L.fused_linear_bidirectional_kl(nan_hidden, weight, compiled=True, alpha=alpha, **teacher))
