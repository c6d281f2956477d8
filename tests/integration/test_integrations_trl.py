"""ARKDGKDTrainer against TRL's own GKDTrainer (the real one, on tiny models built here): the same loss and weights
for arkd's GeneralizedJSDLoss at beta 0, 0.5, 1 (off- and on-policy, logits and fused-linear paths, gradient
accumulation); the learned policy's log and an exact kill-and-resume; the refusals."""

from __future__ import annotations

import logging
import os

import pytest

pytest.importorskip("trl.experimental.gkd")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402
from _hf_tiny import GKDCollator, assert_same_weights, models, rows, tokenizer, weights  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from arkd.integrations.trl import STATE_FILE, ARKDGKDTrainer  # noqa: E402
from arkd.losses import BidirectionalKLLoss, ForwardKLLoss, GeneralizedJSDLoss  # noqa: E402
from arkd.policy import AlphaSignalProbe, LearnedPolicy  # noqa: E402
from arkd.reward import PairedReward  # noqa: E402


def _config(tmp_path, **overrides) -> GKDConfig:
    options = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1.0, optim="sgd",
        lmbda=0.0, beta=0.5, max_new_tokens=6, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
        seed=0, bf16=False, lr_scheduler_type="constant", disable_tqdm=True, max_grad_norm=0.0,
    )  # fmt: skip
    options.update(overrides)
    return GKDConfig(**options)


def _run(cls, tmp_path, data, **kwargs):
    config = kwargs.pop("config")
    teacher, student = models()
    trainer = cls(model=student, teacher_model=teacher, args=config, train_dataset=data, data_collator=GKDCollator(),
                  processing_class=tokenizer(), **kwargs)  # fmt: skip
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def data():
    return datasets.Dataset.from_list(rows(8))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("fused_linear", [False, True])
def test_one_step_equals_trl_gkd(tmp_path, data, beta, fused_linear):
    """Same batch, same seed: TRL's GKDTrainer(beta) and ARKDGKDTrainer(loss=GeneralizedJSDLoss(beta)) give the same
    loss and, after SGD at learning rate 1 (the update is the gradient), the same weights."""
    ref = _run(GKDTrainer, tmp_path / "trl", data, config=_config(tmp_path / "trl", beta=beta))
    got = _run(ARKDGKDTrainer, tmp_path / "arkd", data, config=_config(tmp_path / "arkd", beta=beta),
               loss=GeneralizedJSDLoss(beta=beta), fused_linear=fused_linear)  # fmt: skip
    assert got._arkd_fused is fused_linear
    assert got.state.log_history[0]["loss"] == pytest.approx(ref.state.log_history[0]["loss"], rel=1e-5)
    assert_same_weights(weights(got.model), weights(ref.model), rtol=1e-5, atol=1e-6)
    moved = max(float((a - b).abs().max()) for a, b in zip(weights(got.model).values(), weights(models()[1]).values()))
    assert moved > 1e-4  # the step did something the comparison can see


def test_gradient_accumulation_and_on_policy_generation_equal_trl(tmp_path, data):
    """lmbda=1 (every batch is the student's own samples, GKD's generation) with two micro-batches per step
    (num_items_in_batch normalisation): still TRL's loss and weights, over two steps."""
    config = dict(lmbda=1.0, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                  learning_rate=0.5)  # fmt: skip
    ref = _run(GKDTrainer, tmp_path / "trl", data, config=_config(tmp_path / "trl", **config))
    got = _run(ARKDGKDTrainer, tmp_path / "arkd", data, config=_config(tmp_path / "arkd", **config),
               loss=GeneralizedJSDLoss(beta=0.5))  # fmt: skip
    for a, b in zip(got.state.log_history[:2], ref.state.log_history[:2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert_same_weights(weights(got.model), weights(ref.model), rtol=1e-5, atol=1e-6)


def test_default_is_bidirectional_kl_at_half_and_says_beta_is_unused(tmp_path, data, caplog):
    with caplog.at_level(logging.WARNING, logger="arkd.integrations.trl"):
        got = _run(ARKDGKDTrainer, tmp_path, data, config=_config(tmp_path, learning_rate=1e-3))
    assert isinstance(got.kd_loss, BidirectionalKLLoss) and got.kd_loss.reduction == "sum"
    assert "GKDConfig.beta=0.5 is not used" in caplog.text
    row = got.state.log_history[0]
    assert row["alpha"] == 0.5 and row["kd_loss"] == pytest.approx((row["fkl"] + row["rkl"]) / 2, rel=1e-4)


class _Crash(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt("killed")


def _learned(tmp_path, data, callbacks=()):
    config = _config(tmp_path, max_steps=40, learning_rate=3e-3, optim="adamw_torch", max_grad_norm=1.0,
                     save_strategy="steps", save_steps=20, per_device_train_batch_size=4)  # fmt: skip
    teacher, student = models()
    return ARKDGKDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=data, data_collator=GKDCollator(),
        processing_class=tokenizer(), callbacks=list(callbacks), loss=BidirectionalKLLoss(),
        alpha=LearnedPolicy(seed=0, lr=5e-2), reward=PairedReward(interval=2), probe=AlphaSignalProbe(interval=4),
    )  # fmt: skip


@pytest.mark.slow
def test_learned_policy_logs_and_resumes_exactly(tmp_path):
    """40 steps with the learned policy, its paired reward and the probe: alpha, rewards, FKL / RKL and probe slopes
    are in the Trainer's log; killed after step 25 and resumed from checkpoint-20 it ends where the uninterrupted run
    ends (weights, policy state, every logged value of steps 21-40)."""
    data = datasets.Dataset.from_list(rows(48, seed=1))  # 12 steps an epoch: epoch ends fall back to the own batch
    full = _learned(tmp_path / "full", data)
    full.train()
    log = {row["step"]: row for row in full.state.log_history if "loss" in row}
    assert sorted(log) == list(range(1, 41))
    assert all(0 < log[s]["alpha"] < 1 and log[s]["fkl"] > 0 and log[s]["rkl"] > 0 for s in log)
    assert [s for s in log if "reward" in log[s]] == list(range(2, 41, 2))
    assert [s for s in log if "alpha_signal_slope" in log[s]] == list(range(4, 41, 4))
    assert "policy_entropy" in log[40] and log[12].get("held_out_same") == 1.0 and "held_out_same" not in log[10]
    alphas = {round(log[s]["alpha"], 6) for s in log}
    assert len(alphas) > 5  # the policy moved
    assert os.path.isfile(tmp_path / "full" / "checkpoint-20" / STATE_FILE)

    crashed = _learned(tmp_path / "resumed", data, callbacks=[_Crash(25)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = _learned(tmp_path / "resumed", data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-20"))
    assert_same_weights(weights(resumed.model), weights(full.model), rtol=0, atol=1e-6)
    policy_a, policy_b = full.alpha_strategy.state_dict(), resumed.alpha_strategy.state_dict()
    assert_same_weights(policy_a["network"], policy_b["network"], rtol=0, atol=1e-6)
    assert full.alpha_probe.slopes == pytest.approx(resumed.alpha_probe.slopes, rel=1e-5, abs=1e-9)
    again = {row["step"]: row for row in resumed.state.log_history if "loss" in row}
    for step in range(21, 41):
        for key in ("loss", "alpha", "reward", "alpha_signal_slope", "fkl", "rkl"):
            if key in log[step]:
                assert again[step][key] == pytest.approx(log[step][key], rel=1e-4, abs=1e-7), (step, key)


def test_refusals_are_one_sentence(tmp_path, data):
    teacher, student = models()
    common = dict(model=student, teacher_model=teacher, args=_config(tmp_path), train_dataset=data,
                  data_collator=GKDCollator(), processing_class=tokenizer())  # fmt: skip
    with pytest.raises(ValueError, match="takes no alpha"):
        ARKDGKDTrainer(**common, loss=GeneralizedJSDLoss(), alpha=LearnedPolicy())
    with pytest.raises(TypeError, match="alpha must be a number"):
        ARKDGKDTrainer(**common, alpha="fkl")
    with pytest.raises(ValueError, match="cannot: use BidirectionalKLLoss"):
        ARKDGKDTrainer(**common, loss=ForwardKLLoss(), fused_linear=True)
    with pytest.raises(ValueError, match="need an alpha strategy"):
        ARKDGKDTrainer(**common, loss=GeneralizedJSDLoss(), probe=AlphaSignalProbe())
