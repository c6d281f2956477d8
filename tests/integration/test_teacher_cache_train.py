"""The teacher cache through the real entry points: arkd-cache-teacher writes it from a run's config, arkd-train with
teacher.cache_dir reads it and never builds the teacher (checked), and at k = V trains as the live teacher does;
refusals before any work in one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from arkd.checkpoint import load_weights
from arkd.config_paths import config_dir
from arkd.run_log import read_metrics


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _common(tmp_path: Path) -> list[str]:
    return [
        "config=tiny",
        f"cache_dir={tmp_path / 'sft'}",
        "init_sft.teacher.max_steps=4",
        "init_sft.teacher.batch_size=8",
        "init_sft.student=null",
        "data.splits.n_train=96",
        "data.splits.n_validation=4",
        "data.batch_size=8",
        "data.group_by_length=2",
        "trainer.max_steps=4",
        "trainer.grad_accum=2",
        "trainer.eval_interval=4",
        "trainer.log_interval=1",
        "trainer.progress=false",
        "reward=paired",
        "reward.interval=2",
        "validation.max_new_tokens=2",
        "validation.subset=2",
        "report.enabled=false",
    ]


def _vocab(tmp_path: Path) -> int:
    from hydra.utils import instantiate

    return len(instantiate(_compose(*_common(tmp_path)).tokenizer))


def test_arkd_train_from_the_cache_never_builds_the_teacher_and_matches_the_live_run(tmp_path, monkeypatch):
    """k = V: the cached run's losses and weights equal the live run's to float tolerance (length-grouped batches,
    grad_accum 2, the learned policy with paired rewards and the probe, validation FKL / RKL)."""
    from arkd.recipes import distill

    common = _common(tmp_path)
    live = distill.run(_compose(*common, f"output_dir={tmp_path / 'live'}"))
    assert live["steps"] == 4
    v = _vocab(tmp_path)
    cache = [f"teacher.cache_dir={tmp_path / 'teacher_cache'}", f"teacher.top_k={v}"]
    proc = subprocess.run(
        [sys.executable, "-m", "arkd.cli.cache_teacher", "--no-progress", "--shard-rows", "32", *common, *cache],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"top {v}" in proc.stdout and "arkd-cache-teacher: done" in proc.stdout
    manifest = json.loads((tmp_path / "teacher_cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["identity"]["top_k"] == v and len(manifest["shards"]) >= 3

    def no_teacher_sft(role, *args, **kwargs):
        assert role != "teacher", "the teacher was built although teacher.cache_dir is set"
        return original_sft(role, *args, **kwargs)

    def no_teacher_build(node, tokenizer):
        assert node._key() != "teacher", "the teacher was built although teacher.cache_dir is set"
        return original_build(node, tokenizer)

    original_sft, original_build = distill.sft_cached, distill.build_model
    monkeypatch.setattr(distill, "sft_cached", no_teacher_sft)
    monkeypatch.setattr(distill, "build_model", no_teacher_build)
    cached = distill.run(_compose(*common, *cache, f"output_dir={tmp_path / 'cached'}"))
    assert cached["steps"] == 4

    rows = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in ("live", "cached")}
    train = {name: [r for r in value if r.get("split") != "validation"] for name, value in rows.items()}
    for a, b in zip(train["live"], train["cached"], strict=True):
        for key in ("loss", "fkl", "rkl", "alpha_mean", "reward", "alpha_signal_slope"):
            if a.get(key) is None:
                assert b.get(key) is None, key
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    val = {name: [r for r in value if r.get("split") == "validation"][-1] for name, value in rows.items()}
    for key in ("val_loss", "val_fkl", "val_rkl"):
        assert val["cached"][key] == pytest.approx(val["live"][key], rel=1e-4), key
    a = load_weights(tmp_path / "live" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "cached" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)

    # Refused before any work, in one sentence each: a loss without a top-k form, another k, no cache at all.
    from arkd.errors import ConfigError

    with pytest.raises(ConfigError, match="AdaptiveKLLoss needs the teacher's full logits"):
        distill.run(_compose(*common, *cache, "loss=adaptive_kl", f"output_dir={tmp_path / 'x1'}"))
    with pytest.raises(ConfigError, match=f"holds the top {v} log-probabilities per token but this run asks for "
                       "teacher.top_k=16"):  # fmt: skip
        distill.run(_compose(*common, cache[0], "teacher.top_k=16", f"output_dir={tmp_path / 'x2'}"))
    with pytest.raises(ConfigError, match="holds no teacher cache"):
        distill.run(_compose(*common, f"teacher.cache_dir={tmp_path / 'none'}", f"output_dir={tmp_path / 'x3'}"))
    with pytest.raises(ConfigError, match="written for another run: the data"):
        distill.run(_compose(*common, *cache, "data.max_length=100", f"output_dir={tmp_path / 'x4'}"))
    # the same through the arkd-train command line: exit 2 and one line
    proc = subprocess.run(
        [sys.executable, "-m", "arkd.cli.train", *common, f"teacher.cache_dir={tmp_path / 'none'}",
         f"hydra.run.dir={tmp_path / 'x5'}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("arkd-train: teacher.cache_dir=") and "holds no teacher cache" in last
    assert "Traceback" not in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("_train_worker.py")


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun is not installed")
def test_two_gloo_processes_from_the_cache_match_the_live_teacher(tmp_path):
    """DDP on two gloo processes: each rank reads its own rows from the cache; at k = V the ranks stay identical and
    end where the live-teacher run on two processes ends (float tolerance). The teacher is the tiny model as built
    (init_sft.teacher=null): a teacher SFT'd on two processes is another model than the writer's one-process SFT."""
    from hydra.utils import instantiate

    from arkd.cli.cache_teacher import write_for_config

    common = [
        "config=tiny",
        f"cache_dir={tmp_path / 'sft'}",
        "trainer.cpu=true",
        "init_sft.teacher=null",
        "init_sft.student=null",
        "data.splits.n_train=64",
        "data.splits.n_validation=4",
        "data.batch_size=4",
        "trainer.max_steps=3",
        "trainer.eval_interval=0",
        "trainer.progress=false",
        "reward=paired",
        "reward.interval=1",
        "validation.max_new_tokens=2",
        "report.enabled=false",
    ]
    v = len(instantiate(_compose(*common).tokenizer))
    cache = [f"teacher.cache_dir={tmp_path / 'teacher_cache'}", f"teacher.top_k={v}"]
    write_for_config(_compose(*common, *cache), progress=False)
    dumps = {}
    for name, extra in (("live", []), ("cached", cache)):
        dump = tmp_path / f"dump_{name}"
        dump.mkdir()
        import os

        env = dict(os.environ, ARKD_TEST_DUMP=str(dump), OMP_NUM_THREADS="1")
        cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               str(WORKER), *common, *extra, f"hydra.run.dir={tmp_path / name}"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        dumps[name] = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    rank0, rank1 = dumps["cached"]
    for key, value in rank0["student"].items():
        assert torch.equal(value, rank1["student"][key]), key
    for key, value in dumps["live"][0]["student"].items():
        torch.testing.assert_close(rank0["student"][key], value, rtol=1e-4, atol=1e-4, msg=key)
