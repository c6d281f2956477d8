"""Run directories (arkd.run_dir): writable before the work, never shared by two runs, resumed only with a
compatible config; checkpoint and model writes on a full disk keep what was already written."""

from __future__ import annotations

import errno

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from arkd import checkpoint as ckpt
from arkd.config_paths import config_dir
from arkd.errors import ConfigError, OutputError
from arkd.run_dir import check_writable, config_differences, prepare_run_dir, refuse_existing_outputs


def _cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=["config=tiny", *overrides])


def _checkpoint(run_dir, step=2):
    config = (run_dir / "config.yaml").read_text()
    return ckpt.write_checkpoint(
        run_dir / "checkpoints", step, model_state={"w": torch.ones(2)}, state={}, rng_states=[], config_text=config
    )


def test_a_directory_holding_another_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(_cfg(), run, is_main=True) is None
    assert (run / "config.yaml").is_file()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError) as info:
        prepare_run_dir(_cfg(), run, is_main=True)
    assert str(info.value) == (
        f"the run directory {run} already holds a run (config.yaml, metrics.jsonl); expected a new directory, "
        "trainer.resume=auto to continue that run, or trainer.overwrite=true to replace it."
    )
    _checkpoint(run)
    assert prepare_run_dir(_cfg("trainer.resume=auto"), run, is_main=True) == run / "checkpoints" / "step_0000002"
    assert prepare_run_dir(_cfg("trainer.overwrite=true"), run, is_main=True) is None
    # the old run's files are gone, as asked (the lock file of the run directory stays)
    assert sorted(p.name for p in run.iterdir()) == [".arkd.lock", "config.yaml"]


def test_resume_refuses_a_changed_config_with_the_differences(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(_cfg(), run, is_main=True)
    _checkpoint(run)
    with pytest.raises(ConfigError) as info:
        prepare_run_dir(_cfg("trainer.resume=auto", "optimizer.lr=0.01", "policy=fkl"), run, is_main=True)
    message = str(info.value)
    assert message.startswith(f"trainer.resume=auto: this config differs from the one {run / 'checkpoints'}")
    assert "optimizer.lr: 0.002 -> 0.01" in message and "policy._target_: 'arkd.policy.LearnedPolicy' -> " in message
    assert message.endswith(
        "expected the same config, or trainer.resume_accept_changes=true to continue with the new values."
    )
    assert "lr: 0.002" in (run / "config.yaml").read_text()  # the refused run did not overwrite the record
    # Paths, logging and save / validation intervals may change; an explicit key accepts the rest.
    ok = _cfg("trainer.resume=auto", "trainer.log_interval=1", "trainer.save_interval=7", "trainer.progress=false")
    assert prepare_run_dir(ok, run, is_main=True) is not None
    notes = []
    accepted = _cfg("trainer.resume=auto", "optimizer.lr=0.01", "trainer.resume_accept_changes=true")
    assert prepare_run_dir(accepted, run, is_main=True, report=notes.append) is not None
    assert notes == ["arkd: resuming with 1 accepted config change(s): optimizer.lr: 0.002 -> 0.01"]
    assert "lr: 0.01" in (run / "config.yaml").read_text()


def test_config_differences_lists_added_removed_and_changed_leaves():
    old = {"a": {"b": 1, "c": 2}, "output_dir": "x", "report": {"subset": 1}}
    new = {"a": {"b": 1, "d": 3}, "output_dir": "y", "report": {"subset": 2}}
    assert config_differences(old, new) == ["a.c: 2 -> '<absent>'", "a.d: '<absent>' -> 3"]


def test_an_unwritable_directory_is_one_sentence_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        OutputError, match=rf"^cannot write to the run directory {blocker}/run: a part of the path is a file\.$"
    ):
        check_writable(blocker / "run", "run directory")
    with pytest.raises(OutputError, match=r"is a file; expected a directory\.$"):
        check_writable(blocker)


def test_existing_outputs_are_refused_without_the_overwrite_key(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^the output directory .* already holds results\.json; expected a new"):
        refuse_existing_outputs(tmp_path, ["results.json", "results.md"], overwrite=False, key="overwrite=true")
    refuse_existing_outputs(tmp_path, ["results.json"], overwrite=True, key="overwrite=true")


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint(root, 1, model_state={"w": torch.ones(2)}, state={"a": 1}, rng_states=[])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OutputError) as info:
        ckpt.write_checkpoint(root, 2, model_state={"w": torch.ones(2)}, state={"a": 2}, rng_states=[], keep_last=1)
    assert str(info.value) == (
        f"cannot write the checkpoint {root / 'step_0000002'}: no space left on the device; "
        "the earlier checkpoints are untouched."
    )
    assert [p.name for p in root.iterdir()] == ["step_0000001"]  # no partial directory left
    assert ckpt.verify_checkpoint(root / "step_0000001") is None
