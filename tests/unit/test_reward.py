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


def test_same_batch_reward_is_before_minus_after_under_one_dropout_mask():
    """SameBatchReward.measure: the student's logits after the step (a forward that replays the training forward's
    random state) against the logits before, per counted token, at each granularity (the naive reference: D from
    torch.nn.functional before and after)."""
    from types import SimpleNamespace

    from arkd import rng

    s, t, mask = logits()
    closer = 0.5 * (s + t)

    class After(torch.nn.Module):  # the student after the step: its next-token logits are `closer`, plus dropout
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, attention_mask, **_):
            noise = torch.nn.functional.dropout(torch.ones_like(closer), 0.5)  # replayed: the same mask each time
            out = closer + 1e-3 * noise
            return SimpleNamespace(logits=torch.cat([out, out[:, -1:]], dim=1))

    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    state = rng.snapshot(torch.device("cpu"))
    with rng.replaying(state, torch.device("cpu")):
        after = After()(**batch).logits[:, :-1]
    before_d, after_d = ref_token_d(s, t), ref_token_d(after, t)
    reward = R.SameBatchReward(interval=1)
    for gran in ("batch", "sequence", "token"):
        mean, per_batch = reward.measure(After(), [(batch, s, t, mask, state)], temperature=1.0, granularity=gran)
        gain = torch.where(mask, before_d - after_d, 0.0)
        expected = {"batch": gain[mask].mean(), "token": gain}.get(gran)
        if gran == "sequence":
            expected = torch.stack([gain[b][mask[b]].mean() for b in range(3)])
        torch.testing.assert_close(per_batch[0], expected)
        assert mean == pytest.approx(float(gain[mask].mean()), rel=1e-5)
    assert mean > 0  # closer to the teacher after the step


def test_paired_reward_options_and_rewards():
    reward = R.PairedReward(interval=3, candidates=4)
    assert [reward.due(step) for step in (1, 2, 3, 6)] == [False, False, True, True]
    torch.testing.assert_close(reward.rewards(1.0, [0.5, 1.25]), torch.tensor([0.5, -0.25], dtype=torch.float64))
    with pytest.raises(ValueError, match="reward.candidates must be >= 2"):
        R.PairedReward(candidates=1)
    with pytest.raises(ValueError, match="reward.held_out must be one of"):
        R.PairedReward(held_out="later")
    with pytest.raises(ValueError, match="reward.interval must be >= 1"):
        R.SameBatchReward(interval=0)


def test_bad_shapes_raise():
    s, t, mask = logits()
    with pytest.raises(ValueError, match="same shape"):
        R.alignment(s, t[..., :-1], mask)
    with pytest.raises(ValueError, match="mask shape"):
        R.alignment(s, t, mask[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        R.alignment(s, t, mask, temperature=0)
