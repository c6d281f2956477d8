"""A sweep through Hydra's submitit plugin (hydra/launcher=slurm_local): each run is a job of two processes which
arkd-train turns into one gloo process group from submitit's variables, as it does from Slurm's on a cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

BIN = Path(sys.executable).parent

# An untrained tiny teacher and student (no SFT), four steps, no final report: the process group is what is tested.
SMALL = [
    "trainer.cpu=true",
    "init_sft.teacher=null",
    "init_sft.student=null",
    "data.splits.n_train=128",
    "data.splits.n_validation=8",
    "data.splits.n_test=8",
    "data.batch_size=4",
    "trainer.max_steps=4",
    "trainer.log_interval=1",
    "trainer.eval_interval=0",
    "trainer.save_interval=4",
    "validation.max_new_tokens=4",
    "report.enabled=false",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_task_job_through_the_submitit_launcher_forms_one_process_group(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, ARKD_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    env["MASTER_PORT"] = str(_free_port())  # kept by arkd.distributed_env (a free port rather than the job's)
    cmd = [
        str(BIN / "arkd-train"),
        "-m",
        "hydra/launcher=slurm_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.gpus_per_node=0",
        f"hydra.sweep.dir={sweep}",
        "config=tiny",
        "seed=0",
        *SMALL,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    logs = sorted((sweep / ".submitit").glob("*/*_log.*"))
    tails = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in logs)
    assert proc.returncode == 0, proc.stderr[-3000:] + tails
    run_dir = sweep / "0"
    # Two processes trained together: one random-state file per rank in the checkpoint, one run directory.
    checkpoint = run_dir / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in checkpoint.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert (run_dir / "final").is_dir() and (run_dir / "metrics.jsonl").is_file()
    outs = {p.name.split("_")[1]: p.read_text() for p in logs if p.name.endswith("_log.out")}
    assert set(outs) == {"0", "1"}
    assert "arkd-train: done" in outs["0"] and "arkd-train: done" not in outs["1"]  # rank 0 alone prints
