"""The horizon reward and the horizon probe (arkd.branching) through the real trainer: branches restore exactly,
rewards are the branches' scores on the reward split, and on a toy built with a short-horizon bias the one-step
reward prefers the wrong alpha while the horizon reward prefers the right one."""

from __future__ import annotations

import pytest
import torch
from _toys import BlockLoader, TableLM, context_rows
from _trainers import make_trainer

from arkd.losses import BidirectionalKLLoss
from arkd.policy import AlphaSignalProbe, ConstantAlpha, LearnedPolicy
from arkd.reward import HorizonReward, PairedReward
from arkd.trainer import BatchStream, Trainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, BLOCKS, H, LR = 128, 24, 16, 0.5


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A problem with a short-horizon bias (measured in :func:`test_the_toy_has_a_short_horizon_bias`).

    The teacher has two modes (0.3 and 0.7) and almost nothing elsewhere (1e-6 per token); the student starts on the
    first mode with 2 % on the second and 60 % spread over the 126 tail tokens. Reverse KL removes the tail mass fast
    (``q log(q / p)`` is large there), so one step at alpha 0 lowers D = (FKL + RKL) / 2 more than one at alpha 1;
    but reverse KL barely moves mass to the missing mode (its gradient there is proportional to ``q``), so after 16
    steps and at the end forward KL's student is much closer."""
    g = torch.Generator().manual_seed(seed)
    p = torch.full((BLOCKS, V), 1e-6)
    p[:, 0], p[:, 1] = 0.3, 1 - 0.3 - (V - 2) * 1e-6
    q = torch.full((BLOCKS, V), 0.6 / (V - 2))
    q[:, 1], q[:, 0] = 0.02, 1 - 0.02 - 0.6
    noise = 0.02 * torch.randn(2, BLOCKS, V, generator=g)
    return p.log() + noise[0], q.log() + noise[1]


def _reward_rows() -> list[dict[str, torch.Tensor]]:
    return [context_rows(torch.arange(BLOCKS))]  # one row per context: no step trains on these rows


def _trainer(tmp_path, strategy, reward, *, seed=0, offset=0, steps=BLOCKS * H, probe=None, optimizer="sgd"):
    teacher_table, student_table = _tables(seed)
    student = TableLM(student_table, trainable=True)
    scheduler = None
    if optimizer == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=LR)
    else:  # moments and a schedule for the snapshot test
        opt = torch.optim.AdamW(student.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
    return make_trainer(
        student, TableLM(teacher_table, trainable=False), BlockLoader(batch_size=4, block=H, contexts=BLOCKS,
        offset=offset), opt, steps=steps, output_dir=tmp_path, scheduler=scheduler, strategy=strategy, reward=reward,
        probe=probe, reward_batches=_reward_rows(), max_grad_norm=None, log_interval=100,
    )  # fmt: skip


def _fit_rows(trainer) -> list[dict]:
    """The loop's rows (what fit() logs), without validation or checkpoints."""
    rows = []
    while trainer.state.step < trainer.cfg.max_steps:
        step = trainer.state.step
        rows += trainer.branches.run(step) if trainer.branches.due(step) else [trainer.train_step()]
    return rows


def _naive_d(student_table: torch.Tensor, teacher_table: torch.Tensor) -> float:
    """D = (FKL + RKL) / 2 per row of the reward split, from the tables (torch.nn.functional)."""
    log_q, log_p = student_table.log_softmax(-1), teacher_table.log_softmax(-1)
    fkl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    rkl = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    return float((0.5 * (fkl + rkl)).mean())


def test_the_toy_has_a_short_horizon_bias(tmp_path):
    """By construction, on the reward split (one row per context; a block moves only its own context's row): at the
    first state one step at alpha 0 is better, 16 steps at alpha 1 are, and a whole run at alpha 1 ends closer to
    the teacher than one at alpha 0."""
    scores = {}
    for alpha in (0.0, 1.0):
        trainer = _trainer(tmp_path / str(alpha), ConstantAlpha(alpha=alpha), None)
        trainer.train_step()
        after_one = trainer.branches.score()
        for _ in range(H - 1):
            trainer.train_step()
        after_block = trainer.branches.score()
        _fit_rows(trainer)
        scores[alpha] = (after_one, after_block, trainer.branches.score())
    assert scores[0.0][0] < scores[1.0][0]  # one step: reverse KL's is better
    assert scores[1.0][1] < scores[0.0][1] - 0.05  # 16 steps: forward KL's (0.11 nats per context-row here)
    assert scores[1.0][2] < scores[0.0][2] - 0.2  # the whole run (every context trained one block): forward KL's


def test_a_branch_from_a_snapshot_is_the_straight_run_bit_for_bit(tmp_path):
    """AdamW moments, a scheduler, the data position and the policy's sampling: restore, rerun, same numbers."""
    trainer = _trainer(tmp_path, LearnedPolicy(seed=3), PairedReward(interval=2), optimizer="adamw", steps=20)
    for _ in range(3):
        trainer.train_step()
    snap = trainer.snapshot(with_strategy=True)
    first = [trainer.train_step()["loss"] for _ in range(5)]
    weights = trainer.objective.unwrap(trainer.student).table.detach().clone()
    trainer.restore(snap)
    again = [trainer.train_step()["loss"] for _ in range(5)]
    assert again == first
    assert torch.equal(trainer.objective.unwrap(trainer.student).table.detach(), weights)


def test_horizon_rewards_are_the_branches_scores_on_the_reward_split(tmp_path):
    """Every candidate's score is D on the reward split after H real steps at its alpha, recomputed here by an
    independent run at that constant alpha and the naive formula; reward = D(start) - D(branch)."""
    trainer = _trainer(tmp_path / "h", LearnedPolicy(seed=1), HorizonReward(horizon=H, candidates=2), steps=2 * H)
    rows = _fit_rows(trainer)
    assert len(rows) == 2 * H and [r["step"] for r in rows] == list(range(1, 2 * H + 1))
    first = rows[0]
    teacher, student0 = _tables(0)
    assert first["horizon_base"] == pytest.approx(_naive_d(student0, teacher), rel=1e-5)
    for alpha, score in zip(first["horizon_alphas"], first["horizon_scores"]):
        ref = _trainer(tmp_path / f"ref{alpha}", ConstantAlpha(alpha=alpha), None, steps=H)
        for _ in range(H):
            ref.train_step()
        table = ref.objective.unwrap(ref.student).table.detach()
        assert score == pytest.approx(_naive_d(table, teacher), rel=1e-5)
    rewards = [first["horizon_base"] - d for d in first["horizon_scores"]]
    assert first["reward"] == pytest.approx(sum(rewards) / 2, rel=1e-9)
    # continue_from: best: the main line is the better branch (its alpha held for the segment's steps)
    best = first["horizon_alphas"][min(range(2), key=lambda k: first["horizon_scores"][k])]
    assert all(r["alpha_mean"] == pytest.approx(best, abs=1e-6) for r in rows[:H])


@pytest.mark.parametrize("seed", [0, 1])
def test_one_step_reward_prefers_the_wrong_alpha_and_the_horizon_reward_the_right_one(tmp_path, seed):
    """Both rewards decide at the same states (the first step of each block, a fresh copy of the problem) and credit
    the same policy; only the horizon differs. The one-step paired reward drifts the policy toward reverse KL, which
    ends the run worse; the horizon reward toward the FKL-leaning alpha that is best over its horizon."""
    one = _trainer(
        tmp_path / "one", LearnedPolicy(seed=seed, lr=0.02), PairedReward(interval=H, candidates=2), seed=seed, offset=1
    )  # fmt: skip  (reward at steps H, 2H, ...: the first batch of each block)
    one_rows = _fit_rows(one)
    decided = [r["policy_mean"] for r in one_rows if r.get("reward") is not None]
    horizon = _trainer(tmp_path / "horizon", LearnedPolicy(seed=seed, lr=0.02), HorizonReward(horizon=H), seed=seed)
    horizon_rows = _fit_rows(horizon)
    means = [r["horizon_mean_alpha"] for r in horizon_rows if r.get("horizon_mean_alpha") is not None]
    assert len(decided) == BLOCKS and len(means) == BLOCKS
    late = lambda values: sum(values[BLOCKS // 2 :]) / (BLOCKS - BLOCKS // 2)  # noqa: E731
    # D after 16 steps is lowest near alpha 0.7 and after one step at alpha 0 (test_the_toy_has_a_short_horizon_bias)
    assert late(decided) < 0.25, decided  # the one-step reward: toward RKL (the wrong way here)
    assert late(means) > 0.5 and late(means) > late(decided) + 0.3, means  # the horizon reward: toward FKL


def test_horizon_probe_and_one_step_probe_disagree_on_the_toy(tmp_path):
    """At each block's first state the one-step probe's slope points to RKL and the horizon probe's (16 steps, the
    same grid) to FKL; the run itself continues as if no probe had run."""
    probe = AlphaSignalProbe(interval=H, delta=0.2, window=3, same_batch=False, horizon=H, horizon_interval=H)
    trainer = _trainer(tmp_path / "p", ConstantAlpha(alpha=0.5), None, offset=1, probe=probe, steps=4 * H)
    rows = _fit_rows(trainer)
    one = [r["alpha_signal_slope"] for r in rows if r.get("alpha_signal_slope") is not None]
    far = [r["alpha_signal_horizon_slope"] for r in rows if r.get("alpha_signal_horizon_slope") is not None]
    assert len(far) == 4 and all(r.get("alpha_signal_horizon") == H for r in rows if "alpha_signal_horizon" in r)
    assert all(s < 0 for s in one[:3]) and all(s > 0 for s in far), (one, far)
    plain = _trainer(tmp_path / "plain", ConstantAlpha(alpha=0.5), None, offset=1, steps=4 * H)
    plain_rows = _fit_rows(plain)
    assert [r["loss"] for r in plain_rows] == [r["loss"] for r in rows]  # the probe changed nothing


def test_horizon_options_and_combinations_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"^reward.horizon must be an integer >= 1, got 0$"):
        HorizonReward(horizon=0)
    with pytest.raises(ValueError, match="reward.candidates must be an integer >= 2"):
        HorizonReward(candidates=1)
    with pytest.raises(ValueError, match="reward.continue_from must be one of"):
        HorizonReward(continue_from="last")
    with pytest.raises(ValueError, match="policy.granularity=sequence chooses one per sequence or token"):
        _trainer(tmp_path / "g", LearnedPolicy(granularity="sequence"), HorizonReward())
    teacher_table, student_table = _tables(0)
    student = TableLM(student_table, trainable=True)
    with pytest.raises(ValueError, match="scores its branches on a reward split .* and none was given"):
        Trainer(
            student=student, teacher=TableLM(teacher_table, trainable=False), tokenizer=None,
            batches=BatchStream(BlockLoader(4, H, BLOCKS)), strategy=LearnedPolicy(), loss=BidirectionalKLLoss(
                reduction="sum"), optimizer=torch.optim.SGD(student.parameters(), lr=LR), scheduler=None,
            accelerator=__import__("accelerate").Accelerator(cpu=True),
            config=TrainerConfig(max_steps=4, output_dir=str(tmp_path), progress=False), reward=HorizonReward(),
        )  # fmt: skip


def test_branches_are_refused_where_an_engine_shards_the_state_they_snapshot():
    """DeepSpeed and FSDP shard the parameters and optimiser state a branch restores: refused in one sentence, before
    training; DDP and one process are not."""
    from arkd.compat import check_branches
    from arkd.policy import AlphaControl

    control = AlphaControl(LearnedPolicy(), reward=HorizonReward())
    for engine in ("DEEPSPEED", "FSDP"):
        with pytest.raises(ValueError, match=rf"^reward=horizon snapshots .* which {engine} shards across processes"):
            check_branches(control, reward_rows=4, engine=engine)
    probe = AlphaControl(ConstantAlpha(), probe=AlphaSignalProbe(horizon=8))
    with pytest.raises(ValueError, match=r"^probe.horizon snapshots"):
        check_branches(probe, reward_rows=4, engine="FSDP")
    for engine in (None, "NO", "MULTI_GPU"):
        check_branches(control, reward_rows=4, engine=engine)
    check_branches(AlphaControl(ConstantAlpha()), reward_rows=0, engine="DEEPSPEED")  # no branches: nothing to refuse
