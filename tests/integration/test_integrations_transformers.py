"""KDTrainer (a transformers.Trainer) against arkd's own Trainer on the same data: the same losses and weights for
a constant alpha (with and without cross-entropy, logits and fused-linear paths) and, for the learned policy with its
paired reward and the probe, the same alphas, rewards, slopes and weights; the log and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from _hf_tiny import assert_same_weights, models, rows, weights
from accelerate import Accelerator
from transformers import TrainingArguments

from arkd.data import TrainingCollator, build_dataloader
from arkd.integrations.transformers import KDTrainer
from arkd.losses import BidirectionalKLLoss, DiversityAwareRKLLoss, GeneralizedJSDLoss
from arkd.policy import AlphaControl, AlphaSignalProbe, ConstantAlpha, LearnedPolicy
from arkd.reward import HorizonReward, PairedReward
from arkd.trainer import BatchStream, Trainer, TrainerConfig

LR = 0.5


def _args(tmp_path, steps, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=1.0, report_to=[], logging_steps=1, save_strategy="no",
        use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True, bf16=False,
    )  # fmt: skip
    options.update(overrides)
    return TrainingArguments(**options)


def _hf(tmp_path, items, steps, **kwargs):
    teacher, student = models()
    args = kwargs.pop("args", None) or _args(tmp_path, steps)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=items,
                        data_collator=TrainingCollator(0), **kwargs)  # fmt: skip
    trainer.train()
    return trainer


def _arkd(tmp_path, items, steps, *, strategy, loss, reward=None, probe=None, ce_weight=0.0, fused_linear=False):
    teacher, student = models()
    loader = build_dataloader(items, batch_size=4, collate_fn=TrainingCollator(0), seed=0, rank=0, world_size=1,
                              drop_last=True)  # fmt: skip
    config = TrainerConfig(max_steps=steps, max_grad_norm=1.0, ce_weight=ce_weight, log_interval=1,
                           output_dir=str(tmp_path), progress=False, fused_linear=fused_linear)  # fmt: skip
    trainer = Trainer(
        student=student, teacher=teacher, tokenizer=None, batches=BatchStream(loader), strategy=strategy, loss=loss,
        optimizer=torch.optim.SGD(student.parameters(), lr=LR), scheduler=None,
        accelerator=Accelerator(cpu=True, step_scheduler_with_optimizer=False), config=config, reward=reward,
        probe=probe,
    )  # fmt: skip
    return trainer, [trainer.train_step() for _ in range(steps)]


@pytest.mark.parametrize(("ce_weight", "fused_linear"), [(0.0, False), (0.0, True), (0.5, False)])
def test_constant_alpha_equals_arkds_own_trainer(tmp_path, ce_weight, fused_linear):
    items = rows(4)  # one batch: both loops see the same rows at every step
    ref, ref_rows = _arkd(tmp_path / "arkd", items, 3, strategy=ConstantAlpha(alpha=0.3),
                          loss=BidirectionalKLLoss(reduction="sum"), ce_weight=ce_weight)  # fmt: skip
    got = _hf(tmp_path / "hf", items, 3, loss=BidirectionalKLLoss(), alpha=0.3, ce_weight=ce_weight,
              fused_linear=fused_linear)  # fmt: skip
    log = [row for row in got.state.log_history if "loss" in row]
    for a, b in zip(log, ref_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["alpha"] == pytest.approx(0.3) and a["fkl"] == pytest.approx(b["fkl"], rel=1e-5)
    assert_same_weights(weights(got.model), weights(ref.accelerator.unwrap_model(ref.student)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_learned_policy_with_paired_reward_and_probe_equals_arkds_own_trainer(tmp_path):
    """The whole plumbing (features, choose, record's dg/dalpha scale, previews from the unclipped gradient with the
    same clipping, the paired reward, the probe, the policy's update): arkd's loop and the Trainer's agree."""
    items = rows(4)
    parts = lambda: dict(strategy=LearnedPolicy(seed=0, lr=5e-2), reward=PairedReward(interval=1),  # noqa: E731
                         probe=AlphaSignalProbe(interval=2))  # fmt: skip
    ref, ref_rows = _arkd(tmp_path / "arkd", items, 4, loss=BidirectionalKLLoss(reduction="sum"), **parts())
    p = parts()
    got = _hf(tmp_path / "hf", items, 4, loss=BidirectionalKLLoss(),
              alpha=AlphaControl(p["strategy"], reward=p["reward"], probe=p["probe"], model=None))  # fmt: skip
    log = [row for row in got.state.log_history if "loss" in row]
    for a, b in zip(log, ref_rows):
        for key, ref_key in (("loss", "loss"), ("alpha", "alpha_mean"), ("reward", "reward")):
            assert a[key] == pytest.approx(b[ref_key], rel=1e-4, abs=1e-8), key
        if "alpha_signal_slope" in b:
            assert a["alpha_signal_slope"] == pytest.approx(b["alpha_signal_slope"], rel=1e-3, abs=1e-8)
    assert sum("alpha_signal_slope" in row for row in log) == 2
    assert_same_weights(weights(got.model), weights(ref.accelerator.unwrap_model(ref.student)), rtol=1e-4, atol=1e-6)


def test_generalized_jsd_and_a_loss_with_target_ids_run_and_log(tmp_path):
    got = _hf(tmp_path / "jsd", rows(8), 2, loss=GeneralizedJSDLoss(beta=0.5, reduction="mean"))
    assert got.kd_loss.reduction == "sum" and got.alpha_strategy is None
    row = [r for r in got.state.log_history if "loss" in r][-1]
    assert "alpha" not in row and row["kd_loss"] > 0 and row["fkl"] > 0
    drkl = _hf(tmp_path / "drkl", rows(8), 1, loss=DiversityAwareRKLLoss(gamma=0.5))
    assert drkl._arkd_fused is False  # DRKL needs the logits
    assert drkl.state.log_history[0]["loss"] > 0


def test_refusals_are_one_sentence(tmp_path):
    teacher, student = models()
    args = _args(tmp_path, 1)
    with pytest.raises(TypeError, match="teacher_model must be a torch.nn.Module"):
        KDTrainer(model=student, args=args, train_dataset=rows(4))
    with pytest.raises(ValueError, match="both 0"):
        KDTrainer(model=student, teacher_model=teacher, args=args, kd_weight=0.0)
    with pytest.raises(ValueError, match="give reward= and probe= inside"):
        KDTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=args,
                  alpha=AlphaControl(ConstantAlpha()), probe=AlphaSignalProbe())  # fmt: skip
    with pytest.raises(ValueError, match="reward=HorizonReward trains whole branches"):
        KDTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=args,
                  alpha=LearnedPolicy(seed=0), reward=HorizonReward())  # fmt: skip


def test_previews_are_refused_where_they_cannot_run(tmp_path, monkeypatch):
    """A strategy with previews under DeepSpeed, FSDP, several processes or fp16 scaling: one sentence each (the
    set-ups themselves are out of reach on this CPU, so the check is called on a trainer with the flags set)."""
    teacher, student = models()
    trainer = KDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, 1), train_dataset=rows(4),
                        data_collator=TrainingCollator(0), alpha=LearnedPolicy(seed=0))  # fmt: skip
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ValueError, match="DeepSpeed \\(ZeRO\\) shards or owns"):
        trainer._arkd_check_supported()
    trainer.is_deepspeed_enabled, trainer.is_fsdp_enabled = False, True
    with pytest.raises(ValueError, match="FSDP shards"):
        trainer._arkd_check_supported()
    trainer.is_fsdp_enabled = False
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="one process here"):
        trainer._arkd_check_supported()
    monkeypatch.undo()
    trainer.args.fp16 = True
    with pytest.raises(ValueError, match="fp16 training scales them"):
        trainer._arkd_check_supported()
    trainer.args.fp16 = False
    trainer.alpha_strategy, trainer.alpha_reward = ConstantAlpha(alpha=0.2), None  # no previews: nothing refused
    trainer.is_deepspeed_enabled = True
    trainer._arkd_check_supported()


@pytest.mark.parametrize("held_out", ["next", "same"])
def test_the_paired_reward_draws_one_batch_ahead_only_when_it_scores_the_next_batch(tmp_path, held_out):
    drawn = []

    class Counting(TrainingCollator):
        def __call__(self, items):
            drawn.append(len(items))
            return super().__call__(items)

    teacher, student = models()
    trainer = KDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, 2), train_dataset=rows(16),
                        data_collator=Counting(0), alpha=LearnedPolicy(seed=0),
                        reward=PairedReward(interval=1, held_out=held_out))  # fmt: skip
    trainer.train()
    log = [row for row in trainer.state.log_history if "loss" in row]
    assert all("reward" in row and "held_out_same" not in row for row in log)
    # two steps, accelerate's own one-batch prefetch (it looks ahead for the end of the loader), and one batch more
    # when the reward scores the next batch
    assert len(drawn) == 2 + 1 + (held_out == "next")
