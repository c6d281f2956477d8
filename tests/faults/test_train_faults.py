"""arkd-train under faults: divergence, failing runs, corrupt and interrupted checkpoints, signals, changed configs on
resume, reused run directories, full and unwritable disks, and bad values. Each case goes through the console entry
point; the expected behaviour is the row of docs/reliability.md that names the test."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _small import SMALL

from arkd import checkpoint as ckpt
from arkd.run_log import read_metrics

BIN = Path(sys.executable).parent


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") != "validation"]


def _finite_model(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ckpt.load_weights(path / "model.safetensors").values())


def _one_sentence(outcome, prefix: str = "arkd-train: ") -> str:
    assert "Traceback" not in outcome.err, outcome.err[-2000:]
    line = outcome.last_line
    assert line.startswith(prefix), outcome.err[-2000:]
    return line


# -- Divergence and failing runs ------------------------------------------------------------------------------------


def test_diverged_run_without_clipping_fails_and_writes_no_nan_model(arkd_train, tmp_path):
    outcome = arkd_train("optimizer.lr=1e6", "trainer.max_grad_norm=null")
    line = _one_sentence(outcome)
    assert outcome.code == 1 and "arkd-train: done" not in outcome.out
    # Either reason, both true of this run: its weights are no longer finite, or (the trainer's guard measures the
    # gradient norm also without clipping) its non-finite steps were skipped, more than the threshold allows.
    assert line.startswith("arkd-train: the run failed: ") and "final/ was not written" in line
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert not (run / "best").exists() or _finite_model(run / "best")
    healthy = [p for _, p in ckpt.list_checkpoints(run / "checkpoints") if ckpt.is_healthy(p)]
    assert healthy and _finite_model(healthy[-1]) and f"the last healthy checkpoint is {healthy[-1]}" in line


def test_diverged_run_without_clipping_shows_the_nan_in_its_metrics(arkd_train, tmp_path):
    outcome = arkd_train("optimizer.lr=1e6", "trainer.max_grad_norm=null")
    assert outcome.code == 1
    rows = _train_rows(tmp_path / "run")
    assert rows[-1]["skipped_steps"] > 0 or any(r["loss"] is None for r in rows)
    assert not any(r["loss"] == 0.0 for r in rows)
    validation = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "validation"]
    assert not any(r.get("val_fkl") == 0.0 or r.get("val_rkl") == 0.0 for r in validation)


def test_a_nan_logit_is_never_hidden_by_the_default_loss(arkd_train, tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    forward, calls = GPT2LMHeadModel.forward, []

    def nan_once(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:  # the student's forward of step 3: one NaN logit at every position
                out.logits = out.logits.clone().index_fill_(-1, torch.tensor([7]), float("nan"))  # one vocab entry
        return out

    monkeypatch.setattr(GPT2LMHeadModel, "forward", nan_once)
    outcome = arkd_train("trainer.max_skipped_fraction=1.0")
    assert outcome.code == 0
    rows = _train_rows(tmp_path / "run")
    # The step is skipped (the trainer's guard sees the NaN gradient) and its loss is logged as NaN (null), not 0.0.
    assert rows[2]["skipped_steps"] == 1 and rows[-1]["skipped_steps"] == 1
    assert rows[2]["loss"] is None


def test_mostly_skipped_run_with_clipping_fails_with_the_share(arkd_train, tmp_path):
    outcome = arkd_train("optimizer.lr=1e6")
    line = _one_sentence(outcome)
    assert outcome.code == 1
    rows = _train_rows(tmp_path / "run")
    skipped = rows[-1]["skipped_steps"]
    assert skipped >= 2
    assert line.startswith(f"arkd-train: the run failed: {skipped} of 6 steps ({100 * skipped / 6:.0f}%) were skipped")
    assert "more than trainer.max_skipped_fraction=0.1; final/ was not written" in line
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert not (run / "best").exists() or _finite_model(run / "best")
    # keep_last=2, but the newest healthy checkpoint survives rotation
    assert any(ckpt.is_healthy(p) for _, p in ckpt.list_checkpoints(run / "checkpoints"))


def test_the_skipped_share_threshold_is_a_trainer_key(arkd_train, tmp_path):
    outcome = arkd_train("optimizer.lr=1e6", "trainer.max_skipped_fraction=1.0")
    assert outcome.code == 0 and "arkd-train: done" in outcome.out
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def _outputs_finite(path: Path) -> bool:
    """An independent check of a saved model: one forward of the real model class on a few tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return bool(torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all())


def _blow_up_after_step(monkeypatch, at: int) -> None:
    """After optimizer step ``at`` (and its checkpoint), the student's MLP weights are multiplied by 1e30: still
    finite, every output NaN."""
    from arkd.trainer import Trainer

    step = Trainer.train_step

    def train_step(self):
        if self.state.step == at:
            model = self.accelerator.unwrap_model(self.student)
            with torch.no_grad():
                for block in model.transformer.h:
                    block.mlp.c_fc.weight.mul_(1e30)
                    block.mlp.c_proj.weight.mul_(1e30)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_finite_weights_with_nan_outputs_are_never_kept_as_best_or_healthy(arkd_train, tmp_path, monkeypatch):
    _blow_up_after_step(monkeypatch, 2)  # before the first validation (step 3): weights finite, outputs NaN
    outcome = arkd_train()
    line = _one_sentence(outcome)
    assert outcome.code == 1 and "arkd-train: done" not in outcome.out
    assert line.startswith("arkd-train: the run failed: "), line
    run = tmp_path / "run"
    assert _finite_model(run / "checkpoints" / "step_0000004")  # the weights alone pass
    assert not (run / "best").exists() or _outputs_finite(run / "best")
    assert not (run / "final").exists()
    for _, path in ckpt.list_checkpoints(run / "checkpoints"):
        if ckpt.is_healthy(path):  # only the step-2 checkpoint (written before the blow-up) may be healthy
            assert path.name == "step_0000002", path
    assert f"the last healthy checkpoint is {run / 'checkpoints' / 'step_0000002'}" in line


# With the teacher trained by SFT first (3 steps) and cached under cache_dir.
WITH_SFT = [o for o in SMALL if o != "init_sft.teacher=null"]
WITH_SFT += ["init_sft.teacher.max_steps=3", "init_sft.teacher.batch_size=8", "init_sft.teacher.warmup_steps=0"]


def test_a_corrupt_sft_cache_entry_is_named_and_rebuilt(arkd_train, tmp_path):
    assert arkd_train(*WITH_SFT, small=False).code == 0
    (entry,) = (tmp_path / "cache").glob("teacher-sft-*")
    weights = entry / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])  # a torn copy, same name
    outcome = arkd_train(*WITH_SFT, run_dir=tmp_path / "run2", small=False)
    assert outcome.code == 0, outcome.err[-2000:]
    assert (
        f"arkd: the cached SFT'd teacher {entry} is corrupt (model.safetensors has {size // 2} bytes, expected "
        f"{size}); training it again." in outcome.out
    )
    assert ckpt.verify_manifest(entry) is None and weights.stat().st_size == size


def test_a_nan_teacher_in_the_sft_cache_is_named_and_retrained(arkd_train, tmp_path):
    assert arkd_train(*WITH_SFT, small=False).code == 0
    (entry,) = (tmp_path / "cache").glob("teacher-sft-*")
    state = ckpt.load_weights(entry / "model.safetensors")
    for name in list(state):
        if ".mlp.c_" in name and name.endswith("weight"):
            state[name] = state[name] * 1e30  # finite, every output NaN
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, entry / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    if (entry / "manifest.json").is_file():  # consistent checksums: only the model's outputs give it away
        ckpt.write_manifest(entry)
    outcome = arkd_train(*WITH_SFT, run_dir=tmp_path / "run2", small=False)
    assert outcome.code == 0, outcome.err[-2000:]
    expected = f"arkd: the cached SFT'd teacher {entry} is not healthy (its outputs on a probe input hold NaN"
    assert expected in outcome.out
    rows = _train_rows(tmp_path / "run2")
    assert all(r["fkl"] is not None and r["fkl"] > 0 for r in rows)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_seqkd_generations_file_is_named_and_generated_again(arkd_train, tmp_path, damage):
    """Before: a truncated generations file was a permanent, unnamed JSONDecodeError until deleted by hand."""
    seqkd = ["rollout=seqkd", "rollout.max_new_tokens=4", "trainer.max_steps=2", "trainer.eval_interval=0"]
    assert arkd_train(*seqkd).code == 0
    (path,) = (tmp_path / "cache" / "seqkd").glob("*/generations.json")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
        problem = f"generations.json has {len(data) // 2} bytes, expected {len(data)}"
    else:  # a changed digit: still valid JSON, same size
        at = next(i for i in range(len(data) // 2, len(data)) if data[i : i + 1].isdigit())
        path.write_bytes(data[:at] + (b"1" if data[at : at + 1] != b"1" else b"2") + data[at + 1 :])
        problem = "generations.json fails its SHA-256 checksum"
    outcome = arkd_train(*seqkd, run_dir=tmp_path / "run2")
    assert outcome.code == 0, outcome.err[-2000:]
    assert f"arkd: the SeqKD generations {path} are corrupt ({problem}); generating them again." in outcome.out
    assert path.read_bytes() == data and ckpt.verify_manifest(path.parent) is None


# -- Checkpoints ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(arkd_train, tmp_path, damage):
    run = tmp_path / "run"
    assert arkd_train().code == 0
    straight = ckpt.load_weights(run / "final" / "model.safetensors")
    newest = run / "checkpoints" / "step_0000006"
    if damage == "truncate":  # a torn write that still got its COMPLETE marker
        target = newest / "model.safetensors"
        size = target.stat().st_size
        target.write_bytes(target.read_bytes()[: size // 3])
        problem = f"model.safetensors has {size // 3} bytes, expected {size}"
    else:  # silent corruption: one flipped bit, same size
        target = newest / "state.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
        problem = "state.pt fails its SHA-256 checksum"
    assert (newest / "COMPLETE").is_file()

    outcome = arkd_train("trainer.resume=auto")
    assert outcome.code == 0, outcome.err[-2000:]
    assert (
        f"arkd: checkpoint {newest} is corrupt ({problem}); using the previous good one, step_0000004." in outcome.out
    )
    assert f"resuming from {run / 'checkpoints' / 'step_0000004'}" in outcome.out
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3, 4, 5, 6]
    resumed = ckpt.load_weights(run / "final" / "model.safetensors")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    assert ckpt.verify_checkpoint(newest) is None  # step 6 was written again, whole


def test_explicit_resume_from_a_corrupt_checkpoint_is_refused(arkd_train, tmp_path):
    run = tmp_path / "run"
    assert arkd_train().code == 0
    path = run / "checkpoints" / "step_0000006"
    (path / "rng_rank0.pt").unlink()
    outcome = arkd_train(f"trainer.resume={path}")
    assert outcome.code == 2
    assert _one_sentence(outcome) == (
        f"arkd-train: trainer.resume={path}: rng_rank0.pt is missing; expected 'auto' or a complete, intact checkpoint."
    )


def test_temporaries_of_an_interrupted_save_are_cleaned_on_start(arkd_train, tmp_path):
    run = tmp_path / "run"
    assert arkd_train("trainer.max_steps=2").code == 0
    stale = run / "checkpoints" / ".tmp_step_0000004_4242"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    (run / ".tmp_best").mkdir()
    assert arkd_train("trainer.max_steps=2", "trainer.resume=auto").code == 0
    assert not stale.exists() and not (run / ".tmp_best").exists()


def test_sigint_finishes_the_step_checkpoints_and_exits_with_one_line(arkd_train, tmp_path, monkeypatch):
    from arkd.trainer import Trainer

    original = Trainer.train_step

    def interrupted(self):
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    outcome = arkd_train()
    run = tmp_path / "run"
    assert outcome.code == 130
    assert _one_sentence(outcome) == (
        f"arkd-train: stopped by SIGINT after step 3 of 6; checkpoint {run / 'checkpoints' / 'step_0000003'} written; "
        "run the same command with trainer.resume=auto to continue."
    )
    assert len(outcome.err.strip().splitlines()) <= 2  # the notice when the signal arrived, and the last line
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_0000003") is None
    monkeypatch.setattr(Trainer, "train_step", original)
    assert arkd_train("trainer.resume=auto").code == 0
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3, 4, 5, 6]


def test_sigint_during_a_cached_sft_says_it_starts_again(arkd_train, tmp_path, monkeypatch):
    from arkd.trainer import Trainer

    original = Trainer.train_step

    def interrupted(self):
        if self.teacher is None and self.state.step == 1:  # the teacher's SFT stage (no teacher of its own)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    outcome = arkd_train(
        "config=tiny", "data.splits.n_train=64", "reward=paired", "init_sft.teacher.max_steps=20",
        "init_sft.teacher.batch_size=8", "trainer.progress=false", small=False,
    )  # fmt: skip
    assert outcome.code == 130
    assert _one_sentence(outcome) == (
        "arkd-train: stopped by SIGINT during the teacher's SFT, after step 2 of 20; the SFT is not checkpointed for "
        "resuming and starts again on the next run."
    )
    assert not list((tmp_path / "cache").glob("teacher-sft-*"))  # no half-trained model in the cache


def test_sigterm_of_a_real_process_checkpoints_and_exits_143(arkd_train, tmp_path):
    """A preemptible cluster job: SIGTERM to the arkd-train process, which finishes its step and checkpoints."""
    from conftest import SMALL

    run = tmp_path / "run"
    options = [*SMALL, "trainer.eval_interval=0", "trainer.save_interval=0", f"cache_dir={tmp_path / 'cache'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.Popen(
        [str(BIN / "arkd-train"), *options, "trainer.max_steps=400", f"hydra.run.dir={run}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    step = int(last.split("after step ")[1].split(" ")[0])
    path = run / "checkpoints" / f"step_{step:07d}"
    assert last == (
        f"arkd-train: stopped by SIGTERM after step {step} of 400; checkpoint {path} written; "
        "run the same command with trainer.resume=auto to continue."
    )
    assert ckpt.verify_checkpoint(path) is None and 2 <= step < 400

    # Continue it (here one step further, accepting the shorter max_steps).
    outcome = arkd_train(
        "trainer.eval_interval=0",
        "trainer.save_interval=0",
        "trainer.resume=auto",
        f"trainer.max_steps={step + 1}",
        "trainer.resume_accept_changes=true",
    )
    assert outcome.code == 0, outcome.err[-2000:]
    assert f"accepted config change(s): trainer.max_steps: 400 -> {step + 1}" in outcome.out
    assert [r["step"] for r in _train_rows(run)] == list(range(1, step + 2))


# -- Resume compatibility and run directories -----------------------------------------------------------------------


def test_resume_with_another_policy_or_lr_is_refused_with_the_differences(arkd_train, tmp_path):
    run = tmp_path / "run"
    assert arkd_train("trainer.max_steps=2").code == 0
    before = (run / "config.yaml").read_text()
    outcome = arkd_train("trainer.max_steps=2", "trainer.resume=auto", "policy=fkl", "optimizer.lr=0.01")
    line = _one_sentence(outcome)
    assert outcome.code == 2
    assert line.startswith(
        f"arkd-train: trainer.resume=auto: this config differs from the one {run / 'checkpoints' / 'step_0000002'} "
        "was written with ("
    )
    assert (
        re.search(r"optimizer\.lr: [0-9.e-]+ -> 0\.01", line)
        and "policy._target_: 'arkd.policy.LearnedPolicy' -> " in line
    )
    assert line.endswith("or trainer.resume_accept_changes=true to continue with the new values.")
    assert (run / "config.yaml").read_text() == before  # the record of the run is untouched
    accepted = arkd_train("trainer.max_steps=3", "trainer.resume=auto", "trainer.resume_accept_changes=true")
    assert accepted.code == 0 and "trainer.max_steps: 2 -> 3" in accepted.out


# Each key a resume accepts, a new value for it, and where the resumed run must show it: in the optimizer state it
# stepped with (the step-6 checkpoint), or in the trainer's config (read at every step).
ACCEPTED = {
    "optimizer.lr": ("0.01", None),
    "optimizer.weight_decay": ("0.05", ("weight_decay", 0.05)),
    "optimizer.betas": ("[0.8,0.99]", ("betas", (0.8, 0.99))),
    "optimizer.eps": ("1e-06", ("eps", 1e-06)),
    "trainer.max_steps": ("6", None),
    "trainer.max_grad_norm": ("0.5", ("max_grad_norm", 0.5)),
    "trainer.kd_weight": ("0.5", ("kd_weight", 0.5)),
    "trainer.ce_weight": ("0.25", ("ce_weight", 0.25)),
    "trainer.on_nonfinite": ("stop", ("on_nonfinite", "stop")),
    "trainer.max_skipped": ("7", ("max_skipped", 7)),
    "trainer.max_skipped_fraction": ("0.5", ("max_skipped_fraction", 0.5)),
}
_BASE: dict[str, Path] = {}


@pytest.fixture
def four_steps(arkd_train, tmp_path_factory, tmp_path):
    """A copy of a 4-step run (checkpoints at 2 and 4) in ``tmp_path / 'run'``, made once for the module."""
    import shutil

    if "run" not in _BASE:
        base = tmp_path_factory.mktemp("four_steps")
        assert arkd_train("trainer.max_steps=4", run_dir=base / "run").code == 0
        _BASE["run"] = base / "run"
    shutil.copytree(_BASE["run"], tmp_path / "run")
    return tmp_path / "run"


def test_the_accepted_keys_are_the_documented_ones():
    from arkd.run_dir import RESUME_ACCEPTED

    assert sorted(RESUME_ACCEPTED) == sorted(ACCEPTED)


@pytest.mark.parametrize("key", list(ACCEPTED))
def test_every_key_a_resume_accepts_takes_effect(arkd_train, four_steps, tmp_path, monkeypatch, key):
    """Before: the optimizer's hyper-parameters came back from the checkpoint (config.yaml said one thing, the run
    did another)."""
    from arkd.trainer import Trainer

    value, where = ACCEPTED[key]
    seen = {}
    fit = Trainer.fit

    def recording_fit(self, *args, **kwargs):
        seen["cfg"] = self.cfg
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    change = [f"{key}={value}"] if key != "trainer.max_steps" else []
    outcome = arkd_train("trainer.max_steps=6", "trainer.resume=auto", "trainer.resume_accept_changes=true", *change)
    assert outcome.code == 0, outcome.err[-2000:]
    assert "accepted config change(s)" in outcome.out and f"{key}: " in outcome.out
    assert [r["step"] for r in _train_rows(four_steps)] == [1, 2, 3, 4, 5, 6]
    state = ckpt.read_state(four_steps / "checkpoints" / "step_0000006")
    group = state["optimizer"]["param_groups"][0]
    if key == "optimizer.lr":  # the resumed steps ran at the rates of a run started with the new lr
        monkeypatch.setattr(Trainer, "fit", fit)
        assert arkd_train("trainer.max_steps=6", f"optimizer.lr={value}", run_dir=tmp_path / "straight").code == 0
        straight = {r["step"]: r["lr"] for r in _train_rows(tmp_path / "straight")}
        resumed = {r["step"]: r["lr"] for r in _train_rows(four_steps)}
        assert resumed[5] == straight[5] and resumed[6] == straight[6] and resumed[4] != straight[4]
        assert state["scheduler"]["base_lrs"] == [0.01] and group["initial_lr"] == 0.01
    elif key.startswith("optimizer."):
        name, expected = where
        assert tuple(group[name]) == expected if isinstance(expected, tuple) else group[name] == expected
    elif where is not None:
        name, expected = where
        assert getattr(seen["cfg"], name) == expected


def test_a_resume_refuses_a_change_that_cannot_take_effect(arkd_train, four_steps):
    before = (four_steps / "config.yaml").read_text()
    outcome = arkd_train(
        "trainer.max_steps=6", "trainer.resume=auto", "trainer.resume_accept_changes=true", "loss.temperature=2.0"
    )
    assert outcome.code == 2
    line = _one_sentence(outcome)
    assert line.startswith(
        "arkd-train: trainer.resume_accept_changes=true: 1 change(s) cannot take effect on a resume of "
    ), line
    assert "(loss.temperature: 1.0 -> 2.0); a resume may change only optimizer.lr, " in line
    assert (four_steps / "config.yaml").read_text() == before
    assert [r["step"] for r in _train_rows(four_steps)] == [1, 2, 3, 4]


def test_a_run_directory_holding_another_run_is_refused(arkd_train, tmp_path):
    run = tmp_path / "run"
    assert arkd_train("trainer.max_steps=2").code == 0
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    hydra = _tree(run / ".hydra")
    assert hydra
    outcome = arkd_train("trainer.max_steps=2", "seed=1")
    assert outcome.code == 2
    assert _one_sentence(outcome) == (
        f"arkd-train: the run directory {run} already holds a run (config.yaml, metrics.jsonl, checkpoints, best, "
        "final, summary.json); expected a new directory, trainer.resume=auto to continue that run, or "
        "trainer.overwrite=true to replace it."
    )
    for name, data in files.items():  # nothing of the earlier run was touched
        if name != "train.log":
            assert (run / name).read_bytes() == data, name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert _tree(run / ".hydra") == hydra  # not even Hydra's record of the command (before: rewritten)
    replaced = arkd_train("trainer.max_steps=2", "seed=1", "trainer.overwrite=true")
    assert replaced.code == 0
    assert "seed: 1" in (run / "config.yaml").read_text()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_refused_resume_writes_nothing_into_the_run_directory(arkd_train, tmp_path):
    run = tmp_path / "run"
    assert arkd_train("trainer.max_steps=2").code == 0
    before = {name: data for name, data in _tree(run).items() if name != ".arkd.lock"}
    outcome = arkd_train("trainer.max_steps=2", "trainer.resume=auto", "optimizer.lr=0.5")
    assert outcome.code == 2 and "this config differs" in outcome.last_line
    assert {name: data for name, data in _tree(run).items() if name != ".arkd.lock"} == before


def test_a_second_job_on_a_run_directory_in_use_is_refused_and_the_first_loses_nothing(arkd_train, tmp_path):
    """Two resumes of one run directory a second apart: before, both ran and rows of metrics.jsonl were lost."""
    run = tmp_path / "run"
    options = [*SMALL, "trainer.eval_interval=0", "trainer.save_interval=0", f"cache_dir={tmp_path / 'cache'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    first = subprocess.Popen(
        [str(BIN / "arkd-train"), *options, "trainer.max_steps=400", f"hydra.run.dir={run}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        hydra = _tree(run / ".hydra")
        second = arkd_train(
            "trainer.eval_interval=0", "trainer.save_interval=0", "trainer.max_steps=400", "trainer.resume=auto"
        )
        assert _tree(run / ".hydra") == hydra
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=240)
    assert second.code == 2
    assert re.fullmatch(
        rf"arkd-train: the run directory {re.escape(str(run))} is in use by another arkd-train job \(pid {first.pid} "
        r"on \S+, since [0-9: -]+ UTC\); expected one job per run directory: wait for it to end, or use another "
        r"directory\.",
        _one_sentence(second),
    ), second.last_line
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    steps = [r["step"] for r in _train_rows(run)]
    assert steps == list(range(1, steps[-1] + 1))  # every row of the first job, once
    # the lock goes with the job: the same resume now runs
    assert arkd_train("trainer.eval_interval=0", "trainer.max_steps=" + str(steps[-1] + 1), "trainer.resume=auto",
                      "trainer.resume_accept_changes=true").code == 0  # fmt: skip


def test_a_run_that_failed_in_its_set_up_does_not_block_the_corrected_run(arkd_train, tmp_path):
    failed = arkd_train("data.batch_size=100")  # refused once the data is known, after the directory was claimed
    assert failed.code == 2 and "data.batch_size: got 100" in failed.last_line
    outcome = arkd_train("trainer.max_steps=2")
    assert outcome.code == 0, outcome.err[-2000:]


# -- File systems ---------------------------------------------------------------------------------------------------


def test_an_unwritable_run_directory_is_refused_before_anything_is_built(arkd_train, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    outcome = arkd_train(f"output_dir={blocker / 'run'}")
    assert outcome.code == 1
    assert _one_sentence(outcome) == (
        f"arkd-train: cannot write to the run directory {blocker / 'run'}: a part of the path is a file."
    )


def test_an_unwritable_cache_is_refused_before_the_sft_trains(arkd_train, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    outcome = arkd_train(
        "config=tiny", "data.splits.n_train=64", "reward=paired", f"cache_dir={blocker / 'cache'}", small=False
    )
    assert outcome.code == 1
    assert _one_sentence(outcome) == (
        f"arkd-train: cannot write to the cache directory (cache_dir) {blocker / 'cache'}: "
        "a part of the path is a file."
    )
    assert "training the teacher" not in outcome.out


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_directory_is_refused(arkd_train, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        outcome = arkd_train(f"output_dir={locked}")
    finally:
        locked.chmod(0o755)
    assert outcome.code == 1
    assert _one_sentence(outcome) == f"arkd-train: cannot write to the run directory {locked}: permission denied."


def test_a_full_disk_while_checkpointing_is_one_sentence_and_keeps_the_earlier_checkpoint(
    arkd_train, tmp_path, monkeypatch
):
    calls = []
    original = ckpt.save_weights

    def fills_up(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(state, path)

    monkeypatch.setattr(ckpt, "save_weights", fills_up)
    outcome = arkd_train()
    run = tmp_path / "run"
    assert outcome.code == 1
    assert _one_sentence(outcome) == (
        f"arkd-train: cannot write the checkpoint {run / 'checkpoints' / 'step_0000004'}: no space left on the "
        "device; the earlier checkpoints are untouched."
    )
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_0000002") is None


def test_a_full_disk_while_logging_is_one_sentence_naming_the_file(arkd_train, tmp_path, monkeypatch):
    opened = Path.open
    appends = []

    class Full:  # what a full disk does to a write(): an OSError without a file name
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            appends.append(self)
            if len(appends) == 4:
                return Full()
        return opened(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    outcome = arkd_train()
    run = tmp_path / "run"
    assert outcome.code == 1
    assert _one_sentence(outcome) == (
        f"arkd-train: cannot append to {run / 'metrics.jsonl'}: no space left on the device; the rows already "
        "written are kept."
    )
    monkeypatch.setattr(Path, "open", opened)
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_0000002") is None


# -- Bad values, found before any work ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps: got 'abc', expected an integer >= 1."),
        ("trainer.max_steps=0", "trainer.max_steps: got 0, expected an integer >= 1."),
        ("trainer.max_steps=3.5", "trainer.max_steps: got 3.5, expected an integer >= 1."),
        ("optimizer.lr=abc", "optimizer.lr: got 'abc', expected a number >= 0."),
        ("trainer.on_nonfinite=bogus", "trainer.on_nonfinite: got 'bogus', expected one of skip, stop."),
        ("+trainer.unknown_key=1", "trainer.unknown_key: nothing reads this key (a `+` override?); expected one of"),
        (
            "trainer.unknown_key=1",
            "trainer.unknown_key: no such key; expected one of the keys in trainer: best_metric,",
        ),
        ("policy=nope", "unknown policy 'nope'; expected one of: akl, constant, cosine, entropy_gated, fkl, greedy,"),
        ("data.packing=3", "data.packing: got 3, expected true or false."),
        ("data.packing=true", "data.packing=true is exact only for SFT (loss=cross_entropy, no teacher)"),
    ],
)
def test_bad_values_exit_2_with_one_sentence_before_any_work(arkd_train, tmp_path, override, message):
    outcome = arkd_train(override)
    assert outcome.code == 2
    assert _one_sentence(outcome).startswith(f"arkd-train: {message}")
    assert len(outcome.err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # not even the run directory


def test_a_batch_larger_than_the_data_is_refused_before_the_teacher_is_trained(arkd_train, tmp_path):
    # The tiny config's own SFT stages (teacher 450 steps): refused before they start.
    outcome = arkd_train(
        "config=tiny",
        "data.splits.n_train=64",
        "reward=paired",
        "data.batch_size=100",
        "trainer.progress=false",
        small=False,
    )
    assert outcome.code == 2
    line = _one_sentence(outcome)
    assert line.startswith("arkd-train: data.batch_size: got 100, expected at most ")
    assert "(the training split has " in line and "every batch must be full)." in line
    assert not list((tmp_path / "cache").glob("teacher-sft-*")) and "training the teacher" not in outcome.out


# -- Limits checked before any model is trained ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_positions=16", "data.max_length: the longest training row has "),
        ("teacher.n_positions=16", "data.max_length: the longest training row has "),
        ("model.vocab_size=100", "model.vocab_size: the model has 100 vocabulary rows and the tokenizer "),
        ("model.vocab_size=5000", "model.vocab_size: the model has 5000 vocabulary rows and the tokenizer "),
        ("validation.max_new_tokens=120", "validation.max_new_tokens: got 120, and the longest prompt it completes"),
    ],
)
def test_positions_and_vocabularies_are_checked_before_the_teacher_is_trained(arkd_train, tmp_path, override, message):
    """Before: a bare IndexError once SFT had started (leaving a work directory in the cache), or a refusal after
    the teacher's SFT naming a Python argument."""
    outcome = arkd_train(*WITH_SFT, override, small=False)
    assert outcome.code == 2
    line = _one_sentence(outcome)
    assert line.startswith(f"arkd-train: {message}"), line
    assert "training the teacher" not in outcome.out
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# -- Processes that disagree ------------------------------------------------------------------------------------------


def _torchrun_train(tmp_path: Path, args: list[str], rank1_args: str = ""):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", ARKD_TEST_RANK1_ARGS=rank1_args)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
        str(Path(__file__).parent / "_rank_args.py"), "arkd.cli.train", *SMALL, f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not (BIN / "torchrun").exists() or torch.cuda.is_available(), reason="needs torchrun, no GPU")
def test_torchrun_on_cpus_without_trainer_cpu_is_refused_not_run_twice(tmp_path):
    """Before: two independent single-process runs into one directory (every metrics row doubled)."""
    proc = _torchrun_train(tmp_path, [])
    assert proc.returncode != 0
    assert (
        "arkd-train: 2 processes were launched (WORLD_SIZE=2) but they did not join one distributed job" in proc.stderr
    ), proc.stderr[-3000:]
    assert "set trainer.cpu=true (gloo)" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun is not installed")
def test_training_processes_asked_for_different_configs_are_refused(tmp_path):
    proc = _torchrun_train(tmp_path, ["trainer.cpu=true"], rank1_args="optimizer.lr=0.5")
    assert proc.returncode != 0
    assert (
        "arkd-train: the 2 processes of this run were not asked the same: process 1 has optimizer.lr: 0.5 (process 0: "
        in proc.stderr
    ), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "config.yaml").exists()
