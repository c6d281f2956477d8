"""Planted tests of the learned alpha through the real trainer: a toy distillation whose better direction is known
by construction. The probe must find its sign and the policy must drift that way."""

from __future__ import annotations

import pytest
import torch
from _toys import CONTEXTS, ContextLoader, TableLM, V
from _trainers import make_trainer

from arkd.policy import AlphaSignalProbe, LearnedPolicy
from arkd.reward import PairedReward

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tables(case: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student logit tables whose better direction is known by construction.

    With SGD, a step at alpha moves D = (FKL + RKL) / 2 by ``-lr grad D . g(alpha)``, so
    ``d reward / d alpha = lr (|g_F|^2 - |g_R|^2) / 2`` (per row of logits): the longer gradient wins.

    - ``"fkl"``: a teacher with two modes and a tail, a student on the first mode only. FKL's gradient ``q - p``
      (the missing mode and tail) is an order of magnitude longer than RKL's ``q (log q - log p - RKL)``, small
      wherever ``q`` is: reward rises with alpha.
    - ``"rkl"``: a teacher sure of one token (tail mass 1e-6 each), a student spreading 70 % over that tail. RKL's
      gradient, large where ``q`` sits on tokens of tiny ``p``, is about 4x FKL's: reward falls with alpha.
    """
    g = torch.Generator().manual_seed(seed)
    if case == "fkl":
        p = torch.full((CONTEXTS, V), 0.2 / (V - 2))
        p[:, 0], p[:, 1] = 0.45, 0.35
        q = torch.full((CONTEXTS, V), 1.0)
        q[:, 0] = 150.0
    else:
        p = torch.full((CONTEXTS, V), 1e-6)
        p[:, 0] = 1 - (V - 1) * 1e-6
        q = torch.full((CONTEXTS, V), 0.1)
        q[:, 0] = 0.3
    noise = 0.05 * torch.randn(2, CONTEXTS, V, generator=g)
    return p.log() + noise[0], q.log() + noise[1]


@pytest.mark.parametrize("case", ["fkl", "rkl"])
@pytest.mark.parametrize("seed", [0, 1])
def test_probe_finds_the_planted_direction_and_the_policy_follows_it(case, seed, tmp_path):

    teacher_table, student_table = _tables(case, seed)
    student = TableLM(student_table, trainable=True)
    probe = AlphaSignalProbe(interval=2, delta=0.2, window=5)
    policy = LearnedPolicy(granularity="batch", seed=seed)
    trainer = make_trainer(
        student, TableLM(teacher_table, trainable=False), ContextLoader(batch_size=16, seed=seed),
        torch.optim.SGD(student.parameters(), lr=0.3 if case == "fkl" else 0.05), steps=60, output_dir=tmp_path,
        strategy=policy, reward=PairedReward(interval=1, candidates=2), probe=probe, max_grad_norm=None,
    )  # fmt: skip
    rows = [trainer.train_step() for _ in range(60)]
    sign = 1 if case == "fkl" else -1
    slopes = [r["alpha_signal_slope"] for r in rows if r.get("alpha_signal_slope") is not None]
    assert len(slopes) == 30 and sum(sign * s > 0 for s in slopes) >= 27, slopes  # the planted sign
    last = sum(r["alpha_mean"] for r in rows[-10:]) / 10
    assert rows[0]["alpha_mean"] == pytest.approx(0.5, abs=0.02)
    assert (last > 0.8) if case == "fkl" else (last < 0.2), (case, last)
