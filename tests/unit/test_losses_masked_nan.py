"""A NaN (or inf) in an uncounted row of either logits never reaches the loss or the student's gradient, for every
divergence of arkd.losses.functional (the promise of arkd.losses._base.masked_reduce). The reference: the same loss
on the counted rows alone (no mask), whose gradient the counted rows must get, and 0 for the uncounted ones."""

from __future__ import annotations

import pytest
import torch

from arkd.losses import functional as F

LOSSES = [
    "forward_kl", "reverse_kl", "bidirectional_kl", "generalized_jsd", "js_divergence", "total_variation",
    "skew_forward_kl", "skew_reverse_kl", "adaptive_kl", "token_wise_kl", "alpha_beta_divergence",
    "entropy_gated_kl", "diversity_aware_rkl", "taid_kl",
]  # fmt: skip


def _call(name, student, teacher, mask, targets):
    fn = getattr(F, name)
    extra = {"target_ids": targets} if name == "diversity_aware_rkl" else {}
    return fn(student, teacher, mask, reduction="sum", **extra)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_uncounted_row_never_reaches_the_loss_or_the_gradient(name, bad):
    torch.manual_seed(0)
    student = torch.randn(2, 5, 11, dtype=torch.float64)
    teacher = torch.randn(2, 5, 11, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, False]])
    dirty_s, dirty_t = student.clone(), teacher.clone()
    dirty_s[~mask] = bad
    dirty_t[~mask] = bad
    dirty_s.requires_grad_(True)
    loss = _call(name, dirty_s, dirty_t, mask, targets)
    loss.backward()

    counted = student[mask].clone().requires_grad_(True)
    reference = _call(name, counted, teacher[mask], None, targets[mask])
    reference.backward()
    assert torch.isfinite(loss) and torch.isfinite(dirty_s.grad).all(), name
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dirty_s.grad[mask], counted.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(dirty_s.grad[~mask], torch.zeros_like(dirty_s.grad[~mask]))
