"""arkd-train end to end: the tiny job through the real entry point, crash-and-resume equality, two gloo processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from arkd.checkpoint import latest_checkpoint, load_weights, read_state
from arkd.config_paths import config_dir
from arkd.run_log import read_metrics

BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("_train_worker.py")

# A tiny job small enough for CI: a few SFT and KD steps, short generations, small splits.
SMALL = [
    "data.splits.n_train=256",
    "data.splits.n_validation=8",
    "data.splits.n_test=8",
    "data.batch_size=8",
    "init_sft.teacher.max_steps=4",
    "init_sft.teacher.batch_size=8",
    "init_sft.student.max_steps=2",
    "init_sft.student.batch_size=8",
    "trainer.max_steps=6",
    "trainer.log_interval=1",
    "trainer.eval_interval=3",
    "trainer.save_interval=3",
    "reward=paired",
    "reward.interval=2",
    "validation.max_new_tokens=6",
    "report.max_new_tokens=6",
    "report.subset=8",
]
REQUIRED_KEYS = {"step", "loss", "fkl", "rkl", "alpha_mean", "alpha_std", "reward", "policy_entropy", "lr"}
REQUIRED_KEYS |= {"tokens_per_sec"}


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, ARKD_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def test_tiny_job_end_to_end_through_arkd_train(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "arkd-train"), "config=tiny", f"hydra.run.dir={run_dir}", *SMALL]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arkd-train: done" in proc.stdout
    assert "distil" in proc.stderr  # the progress bar
    # stderr is a pipe, not a terminal: each bar writes whole lines (every 5 %), never carriage-return redraws
    assert "\r" not in proc.stderr
    assert 1 <= sum(line.startswith("distil:") for line in proc.stderr.splitlines()) <= 20

    for name in ("config.yaml", "metrics.jsonl", "report.json", "report.md", "alpha_trajectory.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "final" / "tokenizer.json").is_file()
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000006"
    assert len(list((tmp_path / "cache").glob("teacher-sft-*"))) == 1
    assert len(list((tmp_path / "cache").glob("student-sft-*"))) == 1

    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("split") != "validation"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(REQUIRED_KEYS <= set(r) for r in train)
    assert [r["reward"] is not None for r in train] == [False, True, False, True, False, True]
    assert all(0 <= r["alpha_mean"] <= 1 and r["fkl"] >= 0 and r["rkl"] >= 0 for r in train)
    validation = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in validation] == [3, 6] and all("val_rougeL" in r and "val_loss" in r for r in validation)

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["results"]) == {"teacher", "student_before", "student_after"}
    assert report["test_rows"] == 8
    assert report["schema_version"] == 1 and report["strategy"]["name"] == "learned"
    assert report["strategy"]["preset"] == "learned" and report["strategy"]["takes_alpha"] is True
    assert report["training"]["best_mode"] == "max"
    for result in report["results"].values():
        assert 0 <= result["rougeL"]["mean"] <= 100
    assert "student before distillation" in (run_dir / "report.md").read_text()

    # Again with resume=auto: the SFT'd models come from the cache and the finished run has nothing left to do.
    again = cmd + ["trainer.resume=auto"]
    proc = subprocess.run(again, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the SFT'd teacher" in proc.stdout and "resuming from" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") != "validation"] == list(
        range(1, 7)
    )


def test_no_reward_the_action_did_not_cause_dropout_on_lr_zero(tmp_path):
    """GPT-2's dropout 0.1 and a learning rate of 0: a step changes nothing, so every logged reward and every probe
    slope is 0 (|r| <= 1e-6), and report.json carries the alpha_signal block."""
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "arkd-train"), "config=tiny", f"hydra.run.dir={run_dir}", *SMALL]
    cmd += ["model.dropout=0.1", "optimizer.lr=0", "probe.interval=2"]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") != "validation"]
    rewards = [r["reward"] for r in train if r["reward"] is not None]
    slopes = [r[k] for r in train for k in ("alpha_signal_slope", "alpha_signal_slope_same") if r.get(k) is not None]
    assert len(rewards) == 3 and all(abs(r) <= 1e-6 for r in rewards), rewards
    assert len(slopes) == 6 and all(abs(s) <= 1e-6 for s in slopes), slopes
    signal = json.loads((run_dir / "report.json").read_text())["alpha_signal"]
    assert signal["probes"] == 3 and abs(signal["mean_slope"]) <= 1e-6
    assert set(signal) >= {"probes", "windows", "significant_windows", "mean_slope", "sign_agreement"}
    assert "policy_alpha_drift" in signal and "Alpha signal" in (run_dir / "report.md").read_text()


def test_fused_linear_path_through_arkd_train(tmp_path):
    """trainer.fused_linear=true runs the tiny job end to end (the hidden-state check passes for GPT-2)."""
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "arkd-train"), "config=tiny", f"hydra.run.dir={run_dir}", *SMALL, "trainer.fused_linear=true"]
    cmd += ["probe.interval=2", "report.enabled=false"]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") != "validation"]
    assert len(train) == 6 and all(r["loss"] > 0 and r["alpha_mean"] is not None for r in train)
    assert sum(r.get("alpha_signal_slope") is not None for r in train) == 3


def test_multirun_matrix_of_two_strategies_then_arkd_compare(tmp_path):
    """The research loop in small: a Hydra multirun of two strategies x one seed, aggregated by arkd-compare."""
    sweep = tmp_path / "sweep"
    cmd = [str(BIN / "arkd-train"), "-m", "config=tiny", "seed=0", "teacher.seed=0", "policy=fkl,learned"]
    cmd += [f"hydra.sweep.dir={sweep}", *SMALL]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert all((sweep / job / "report.json").is_file() for job in ("0", "1"))
    # One teacher and one SFT'd student serve both strategies (the second run reuses them).
    assert len(list((tmp_path / "cache").glob("teacher-sft-*"))) == 1
    assert proc.stdout.count("reusing the SFT'd teacher") == 1

    out = tmp_path / "compare"
    proc = subprocess.run(
        [str(BIN / "arkd-compare"), str(sweep), "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "comparison.json").read_text())
    assert data["strategies"] == ["fkl", "learned"]
    students = {
        r["strategy"]: r["value"] for r in data["records"] if r["model"] == "student_after" and r["metric"] == "rougeL"
    }
    for job, strategy in (("0", "fkl"), ("1", "learned")):
        report = json.loads((sweep / job / "report.json").read_text())
        assert students[strategy] == pytest.approx(report["results"]["student_after"]["rougeL"]["mean"])
    (difference,) = [d for d in data["differences"]["rougeL"] if d["strategy"] == "fkl"]
    assert difference["n"] == 1 and difference["mean"] == pytest.approx(students["learned"] - students["fkl"])
    for name in ("comparison.md", "heatmap.png", "alpha_trajectory.png"):
        assert (out / name).stat().st_size > 0, name


def test_unknown_config_is_one_sentence(tmp_path):
    proc = subprocess.run(
        [str(BIN / "arkd-train"), "config=nope"], env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown config 'nope'" in lines[0] and "tiny" in lines[0]
    assert "Traceback" not in proc.stderr


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


class _Crash(RuntimeError):
    pass


# DistiLLM's schedule from p = 0.5 with a small buffer and validation every 2 steps: fresh student samples, replays
# and a probability that may rise all happen within the 6 steps; the peeked batch is a generated one.
DISTILLM = [
    "rollout=distillm",
    "rollout.init_probability=0.5",
    "rollout.capacity=12",
    "rollout.max_new_tokens=8",
    "trainer.eval_interval=2",
]


@pytest.mark.parametrize(
    ("dropout", "rollout"), [(0.0, []), (0.1, []), (0.1, DISTILLM)], ids=["plain", "dropout", "distillm"]
)
def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path, monkeypatch, dropout, rollout):
    """Dropout on: the resumed run must draw the same dropout masks as the uninterrupted one (the loader's fresh
    iterator after a resume draws from its own generator, never from the global one that dropout uses). The paired
    reward peeks at the next batch every step, so the checkpoint is written with a peeked batch pending. With
    rollout=distillm the replay buffer, the adaptive probability and a generated peeked batch are in the checkpoint."""
    from arkd.recipes.distill import run
    from arkd.trainer import Trainer

    common = [
        "config=tiny",
        f"cache_dir={tmp_path / 'cache'}",
        "init_sft.teacher=null",
        "init_sft.student=null",
        "data.splits.n_train=128",
        "data.splits.n_validation=4",
        "data.batch_size=8",
        f"model.dropout={dropout}",
        f"data.group_by_length={2 if dropout else 'null'}",  # length-grouped batches resume exactly too
        "trainer.max_steps=6",
        "trainer.save_interval=2",
        "trainer.eval_interval=0",
        "trainer.keep_last=0",
        "trainer.log_interval=1",
        "trainer.progress=false",
        "reward=paired",
        "reward=paired",
        "reward.interval=1",
        "validation.max_new_tokens=2",
        "report.enabled=false",
        *rollout,
    ]
    straight = run(_compose(*common, f"output_dir={tmp_path / 'a'}"))
    assert straight["steps"] == 6

    original = Trainer.train_step

    def crash_at_step_5(self):
        if self.state.step == 4:  # checkpoint step_0000004 is on disk; the process dies during step 5
            raise _Crash("killed")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(_Crash):
        run(_compose(*common, f"output_dir={tmp_path / 'b'}"))
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_0000004"
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = run(_compose(*common, f"output_dir={tmp_path / 'b'}", "trainer.resume=auto"))
    assert resumed["steps"] == 6

    a = load_weights(tmp_path / "a" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    policy_a = read_state(tmp_path / "a" / "checkpoints" / "step_0000006")["strategy"]
    policy_b = read_state(tmp_path / "b" / "checkpoints" / "step_0000006")["strategy"]
    for name, value in policy_a["network"].items():
        torch.testing.assert_close(value, policy_b["network"][name], rtol=0, atol=1e-6, msg=name)
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r.get("split") != "validation"]  # noqa: E731
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-6)
    rollout_a = read_state(tmp_path / "a" / "checkpoints" / "step_0000006")["rollout"]
    rollout_b = read_state(tmp_path / "b" / "checkpoints" / "step_0000006")["rollout"]
    assert len(rollout_a) == len(rollout_b) == 1 and rollout_a[0]["drawn"] == rollout_b[0]["drawn"] == 6
    assert rollout_a[0]["pending_index"] == rollout_b[0]["pending_index"] == 6  # the peeked 7th batch
    for key, value in rollout_a[0]["pending"].items():
        assert torch.equal(value, rollout_b[0]["pending"][key]), key
    if rollout:
        a_state, b_state = rollout_a[0], rollout_b[0]
        assert a_state["probability"] == b_state["probability"] and len(a_state["buffer_prompts"]) > 0
        for key in ("buffer_prompts", "buffer_responses"):
            assert len(a_state[key]) == len(b_state[key])
            assert all(torch.equal(x, y) for x, y in zip(a_state[key], b_state[key]))
        fractions = [
            r["rollout_student_fraction"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r
        ]
        assert set(fractions) <= {0.0, 1.0} and 1.0 in fractions


def test_horizon_reward_resumes_exactly_and_holds_out_its_reward_rows(tmp_path, monkeypatch):
    """reward=horizon through arkd-train: a run killed inside a segment resumes from the checkpoint at the segment's
    start and ends with the straight run's weights and policy; the reward split's rows are never trained on."""
    from arkd.recipes.distill import run
    from arkd.trainer import Trainer

    common = [
        "config=tiny", f"cache_dir={tmp_path / 'cache'}", "init_sft.teacher=null", "init_sft.student=null",
        "data.splits.n_train=96", "data.splits.n_validation=4", "data.batch_size=8", "model.dropout=0.1",
        "reward=horizon", "reward.horizon=3", "reward.rows=16", "trainer.max_steps=9", "trainer.save_interval=3",
        "trainer.eval_interval=0", "trainer.keep_last=0", "trainer.log_interval=1", "trainer.progress=false",
        "validation.max_new_tokens=2", "report.enabled=false",
    ]  # fmt: skip
    trained: list[list[int]] = []
    original_draw = __import__("arkd.window", fromlist=["Window"]).Window.draw

    def record_draw(self, step):
        window = original_draw(self, step)
        for batch, _ in window:
            trained.extend(
                tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
            )
        return window

    monkeypatch.setattr("arkd.window.Window.draw", record_draw)
    straight = run(_compose(*common, f"output_dir={tmp_path / 'a'}"))
    assert straight["steps"] == 9
    cfg = _compose(*common, f"output_dir={tmp_path / 'x'}")
    from hydra.utils import instantiate

    from arkd.data import TokenizedDataset

    train, tokenizer = list(instantiate(cfg.data.splits)["train"]), instantiate(cfg.tokenizer)
    lengths = {"max_prompt_length": int(cfg.data.max_prompt_length), "max_length": int(cfg.data.max_length)}
    rows = TokenizedDataset(train, tokenizer, **lengths)
    tokens = {item.index: tuple(item.prompt_ids + item.response_ids) for item in rows.items}
    held = {tokens[i] for i in range(80, 96)} - {tokens[i] for i in range(80)}  # rows only in the reward split
    assert held and not held & set(trained)  # no step (branch or main line) trained on a reward row
    assert len({tokens[i] for i in range(80)} & set(trained)) > 40  # the rows are compared in the trained form

    original = Trainer.train_step

    def crash_in_the_third_segment(self):
        if self.state.step == 7:  # inside the segment that starts after step 6 (checkpoint step_0000006)
            raise _Crash("killed")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_in_the_third_segment)
    with pytest.raises(_Crash):
        run(_compose(*common, f"output_dir={tmp_path / 'b'}"))
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_0000006"
    monkeypatch.setattr(Trainer, "train_step", original)
    assert run(_compose(*common, f"output_dir={tmp_path / 'b'}", "trainer.resume=auto"))["steps"] == 9
    a = load_weights(tmp_path / "a" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    policy_a = read_state(tmp_path / "a" / "checkpoints" / "step_0000009")["strategy"]["network"]
    policy_b = read_state(tmp_path / "b" / "checkpoints" / "step_0000009")["strategy"]["network"]
    assert all(torch.equal(policy_a[name], policy_b[name]) for name in policy_a)
    rows = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r.get("horizon_alphas")]
    assert [r["step"] for r in rows] == [1, 4, 7] and all(len(r["horizon_scores"]) == 2 for r in rows)


SHORT = [
    "config=tiny",
    "init_sft.teacher=null",
    "init_sft.student=null",
    "data.splits.n_train=64",
    "data.splits.n_validation=4",
    "data.batch_size=8",
    "trainer.max_steps=5",
    "trainer.eval_interval=0",
    "trainer.save_interval=0",
    "trainer.log_interval=1",
    "trainer.progress=false",
    "reward=paired",
    "reward.interval=1",
    "validation.max_new_tokens=2",
    "report.enabled=false",
]


def test_gkd_at_lmbda_0_is_the_plain_run_bit_for_bit_and_at_lmbda_1_never_trains_on_the_dataset(tmp_path, monkeypatch):
    from arkd.objective import Objective
    from arkd.policy.control import AlphaControl
    from arkd.recipes.distill import run

    common = [*SHORT, f"cache_dir={tmp_path / 'cache'}"]
    run(_compose(*common, f"output_dir={tmp_path / 'none'}"))
    run(_compose(*common, "rollout=gkd", "rollout.lmbda=0", f"output_dir={tmp_path / 'zero'}"))
    a = load_weights(tmp_path / "none" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "zero" / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    rows = [r for r in read_metrics(tmp_path / "zero" / "metrics.jsonl") if "loss" in r]
    assert [r["rollout_student_fraction"] for r in rows] == [0.0] * 5 and all(r["rollout_seconds"] == 0 for r in rows)

    seen = []
    original = Objective.__call__
    scorer = AlphaControl.scorer

    def record(self, batch, *args, **kwargs):
        seen.append(batch["on_policy"].tolist())
        return original(self, batch, *args, **kwargs)

    def record_scored(self, parts):
        seen.extend(part[0]["on_policy"].tolist() for part in parts)  # the reward's held-out and same batches
        return scorer(self, parts)

    monkeypatch.setattr(Objective, "__call__", record)
    monkeypatch.setattr(AlphaControl, "scorer", record_scored)
    one = [*common, "rollout=gkd", "rollout.lmbda=1", "rollout.max_new_tokens=6", f"output_dir={tmp_path / 'one'}"]
    run(_compose(*one))
    assert len(seen) >= 5 and all(share == [1.0] * 8 for share in seen)
    rows = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert [r["rollout_student_fraction"] for r in rows] == [1.0] * 5 and all(r["rollout_seconds"] > 0 for r in rows)
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["rollout"] == "gkd" and 0 < summary["rollout_share"] < 1
    assert summary["rollout_seconds"] == pytest.approx(sum(r["rollout_seconds"] for r in rows))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed")
@pytest.mark.parametrize("rollout", [[], ["rollout=distillm", "rollout.init_probability=0.5", "rollout.capacity=12",
                                          "rollout.max_new_tokens=6"]], ids=["dataset", "distillm"])  # fmt: skip
def test_two_gloo_processes_keep_identical_weights(tmp_path, rollout):
    """With rollout=distillm each process generates for its own shard and keeps its own replay buffer."""
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    env = _env(tmp_path)
    env["ARKD_TEST_DUMP"] = str(dump)
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",  # torchrun's port 0 leaves the workers waiting for a rendezvous
        str(WORKER),
        "config=tiny",
        f"hydra.run.dir={run_dir}",
        "trainer.cpu=true",
        *SMALL,
        "reward=paired",
        "reward=paired",
        "reward.interval=1",
        *rollout,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 6
    for part in ("student", "policy"):
        for name, value in rank0[part].items():
            assert torch.equal(value, rank1[part][name]), f"{part}.{name} differs between ranks"
    # Rank 0 alone wrote the run directory; the report covers the three models.
    assert (run_dir / "report.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert not any(p.name.startswith("rank1") for p in run_dir.iterdir())
    states = read_state(latest_checkpoint(run_dir / "checkpoints"))["rollout"]
    assert len(states) == 2 and states[0]["drawn"] == states[1]["drawn"]
    if rollout:  # the same schedule on both processes, each with the samples of its own shard
        assert states[0]["probability"] == states[1]["probability"]
        assert len(states[0]["buffer_prompts"]) == len(states[1]["buffer_prompts"]) > 0
        assert any(not torch.equal(a, b) for a, b in zip(states[0]["buffer_prompts"], states[1]["buffer_prompts"]))
    # Both processes generated the report's rows: 8 test rows dealt 4 and 4.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["num_processes"] == 2 and report["rows_per_process"] == [4, 4]
    assert any("val_rougeL" in row for row in read_metrics(run_dir / "metrics.jsonl"))


def test_a_policy_with_a_loss_that_ignores_alpha_is_said_and_recorded(tmp_path):
    run_dir = tmp_path / "run"
    small = [o for o in SMALL if not o.startswith(("reward.", "report."))] + ["report.enabled=false"]
    cmd = [str(BIN / "arkd-train"), "config=tiny", "loss=forward_kl", "policy=akl", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd + small, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arkd: loss=forward_kl does not take alpha, so policy=akl is not used" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"]["name"] == "loss=forward_kl" and summary["strategy"]["takes_alpha"] is False


def test_rollout_options_a_run_cannot_honour_are_refused_in_one_sentence(tmp_path):
    from arkd.errors import ConfigError
    from arkd.recipes.distill import _check

    base = ["config=tiny", f"output_dir={tmp_path}"]
    with pytest.raises(
        ConfigError, match=r"^rollout=distillm adapts on the validation loss: set trainer.eval_interval"
    ):
        _check(_compose(*base, "rollout=distillm", "trainer.eval_interval=0"))
    with pytest.raises(ConfigError, match=r"^rollout=gkd trains on generated responses, which the teacher cache"):
        _check(_compose(*base, "rollout=gkd", f"teacher.cache_dir={tmp_path / 'cache'}"))
    _check(_compose(*base, "rollout=seqkd"))  # accepted
