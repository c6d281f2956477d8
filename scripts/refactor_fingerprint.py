"""Fingerprints of the runs a refactor of the training step touches: final weights, best weights, the strategy's
state and ``metrics.jsonl`` (timing columns left out), one sha256 each per run.

Record them before a restructuring and compare after it; a pure refactor leaves every line unchanged::

    python scripts/refactor_fingerprint.py --out before.json            # on the code before
    python scripts/refactor_fingerprint.py --out after.json --compare before.json

Each run is the tiny job (``config=tiny``, shortened: 40 steps, validation every 20, no report) in a fresh process,
sharing one SFT cache, with one variant each: the learned policy (paired reward and probe), greedy search, GKD at
lmbda 0.5, grad_accum 2 with one alpha per sequence, one alpha per token, the fused-linear path, the legacy
same-batch reward, a fixed strategy with the probe on, plain SFT, the teacher cache (written first with
arkd-cache-teacher) and a run killed after step 23 and resumed from its step-20 checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"tokens_per_sec", "rollout_seconds"}  # wall-clock columns: differ between any two runs

COMMON = [
    "config=tiny",
    "trainer.max_steps=40",
    "trainer.eval_interval=20",
    "trainer.save_interval=20",
    "trainer.log_interval=1",
    "trainer.progress=false",
    "validation.subset=16",
    "validation.max_new_tokens=8",
    "reward.interval=4",
    "probe.interval=4",
    "report.enabled=false",
]

RUNS: dict[str, list[str]] = {
    "learned": [],
    "greedy": ["policy=greedy"],
    "gkd": ["rollout=gkd", "rollout.lmbda=0.5", "rollout.max_new_tokens=8"],
    "accum2_sequence": ["trainer.grad_accum=2", "policy.granularity=sequence"],
    "accum2_token": ["trainer.grad_accum=2", "policy.granularity=token", "reward=paired"],
    "fused_linear": ["trainer.fused_linear=true"],
    "same_batch": ["reward=same_batch", "reward.interval=3", "policy.granularity=sequence"],
    "fkl_probe": ["policy=fkl", "probe.enabled=true"],
    "sft": ["loss=cross_entropy", "trainer.kd_weight=0", "trainer.ce_weight=1"],
    "teacher_cache": ["teacher.top_k=16"],  # + teacher.cache_dir, written first
    "resume": [],  # killed after step 23, resumed
}


def _one(name: str, run_dir: str, cache: str, crash_after: int | None, resume: bool) -> None:
    """Run one variant in this process (called through a subprocess of this script)."""
    from hydra import compose, initialize_config_dir

    from arkd.config_paths import config_dir
    from arkd.recipes.distill import run
    from arkd.trainer import Trainer

    # The baseline's runs used the paired reward, then the default of policy=learned (the default is now the
    # horizon reward): pinned, unless the variant names its own.
    pinned = [] if any(o.startswith("reward=") for o in RUNS[name]) else ["reward=paired"]
    overrides = [*COMMON, *pinned, *RUNS[name], f"cache_dir={cache}", f"output_dir={run_dir}"]
    if name == "teacher_cache":
        overrides.append(f"teacher.cache_dir={cache}/teacher_cache")
    if resume:
        overrides.append("trainer.resume=auto")
    if crash_after is not None:
        original = Trainer.train_step

        def crash(self):
            if self.state.step == crash_after:
                raise SystemExit(17)
            return original(self)

        Trainer.train_step = crash
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    try:
        run(cfg)
    except SystemExit as stop:
        if stop.code != 17:
            raise


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tensors_sha(path: Path) -> str | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _state_sha(run_dir: Path) -> str | None:
    from arkd.checkpoint import latest_checkpoint, read_state

    last = latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return None
    state = read_state(last)
    h = hashlib.sha256()
    for key in ("strategy", "probe", "loss", "train", "data", "rollout"):
        h.update(repr(_plain(state.get(key))).encode())
    return h.hexdigest()[:16]


def _plain(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().tobytes().hex()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _metrics_sha(path: Path) -> tuple[str, int]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in rows]
    return _sha(json.dumps(rows, sort_keys=True).encode()), len(rows)


def fingerprint(run_dir: Path) -> dict:
    metrics, rows = _metrics_sha(run_dir / "metrics.jsonl")
    return {
        "final": _tensors_sha(run_dir / "final" / "model.safetensors"),
        "best": _tensors_sha(run_dir / "best" / "model.safetensors"),
        "state": _state_sha(run_dir),
        "metrics": metrics,
        "metric_rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where to write the fingerprints (JSON)")
    parser.add_argument("--compare", help="fingerprints recorded before: print any difference, exit 1 if one")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), help=f"a subset of {list(RUNS)}")
    parser.add_argument("--work", help="the directory for runs and the SFT cache (default: a temporary one)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--crash-after", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _one(args.one, args.run_dir, args.cache, args.crash_after, args.resume)
        return
    if not args.out:
        parser.error("--out is required")

    work = Path(args.work or tempfile.mkdtemp(prefix="arkd_fingerprint_"))
    cache = work / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    me = [sys.executable, str(Path(__file__).resolve())]

    def sub(name: str, run_dir: Path, *extra: str) -> None:
        cmd = [*me, "--one", name, "--run-dir", str(run_dir), "--cache", str(cache), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"run {name} failed:\n{proc.stderr[-3000:]}")

    results = {}
    for name in args.runs:
        run_dir = work / name
        if name == "teacher_cache" and not (cache / "teacher_cache" / "manifest.json").is_file():
            sub("learned", work / "_warm_cache")  # the SFT'd teacher in the cache first
            cmd = [sys.executable, "-m", "arkd.cli.cache_teacher", "--no-progress", *COMMON, *RUNS[name],
                   f"cache_dir={cache}", f"teacher.cache_dir={cache}/teacher_cache"]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"arkd-cache-teacher failed:\n{proc.stderr[-3000:]}")
        if name == "resume":
            sub(name, run_dir, "--crash-after", "23")
            sub(name, run_dir, "--resume")
        else:
            sub(name, run_dir)
        results[name] = fingerprint(run_dir)
        print(f"{name:16s} {json.dumps(results[name])}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [n for n in results if n in before and before[n] != results[n]]
        for name in differ:
            print(f"DIFFERS {name}: before {before[name]} after {results[name]}")
        print(f"{len(results) - len(differ)} of {len(results)} runs identical")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
