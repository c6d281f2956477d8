"""The horizon reward's evidence matrix on one testbed: fixed arms, the one-step learned policy, the horizon-reward
learned policy and its two controls, five seeds, then arkd-compare (omnibus first) with the horizon policy as the
reference.

    python scripts/horizon_matrix.py --config tiny_tradeoff --out multirun/horizon_tradeoff --workers 2
    arkd-compare multirun/horizon_tradeoff --out docs/results/horizon_tradeoff --reference learned_horizon

Arms (every setting is the config's own or the presets' defaults, fixed before the runs; nothing per arm):

- fixed: ``policy=fkl``, ``rkl``, ``constant`` (0.5), ``linear``, ``cosine``;
- ``learned``: the learned policy with the one-step paired reward (``reward=paired``; the default of
  ``policy=learned`` when the matrices ran, pinned here since the horizon reward became the default);
- ``learned_horizon``: ``reward=horizon`` (horizon 32, 2 candidates, continue from the best branch, 64 reward rows);
- ``learned_horizon_frozen``: the same with ``policy.lr=0`` (the branches and the best-branch selection without
  learning: separates what the policy learns from what picking the better of two branches gives);
- ``constant_at_horizon_mean``: ``policy=constant policy.alpha=A_s``, A_s the mean ``alpha_mean`` over the logged
  training steps of seed s's ``learned_horizon`` run (run after those).

With ``--carry``, the policy carried across runs (``policy.init_from``) instead: a chain of five runs on seeds
100-104 (in ``OUT_chain/``, beside the sweep, so that arkd-compare does not read it; each starting from the previous
one's policy, the first fresh), then
``learned_horizon_carried`` (seeds as given, each starting from the chain's last policy) and its control
``learned_horizon_carried_frozen`` (the same with ``policy.lr=0``: the carried policy played without learning more).
The chain's seeds are not the evaluation seeds: no evaluated run's data order trained the carried policy.

Runs already finished (a ``report.json`` in their directory) are skipped, so the script can be run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARMS: dict[str, list[str]] = {
    "fkl": ["policy=fkl"],
    "rkl": ["policy=rkl"],
    "constant": ["policy=constant"],
    "linear": ["policy=linear"],
    "cosine": ["policy=cosine"],
    "learned": ["policy=learned", "reward=paired"],
    "learned_horizon": ["policy=learned", "reward=horizon", "label=learned_horizon"],
    "learned_horizon_frozen": ["policy=learned", "policy.lr=0", "reward=horizon", "label=learned_horizon_frozen"],
}


def _command(config: str, out: Path, arm: str, seed: int, extra: list[str]) -> list[str]:
    arkd_train = str(Path(sys.executable).parent / "arkd-train")
    run_dir = out / arm / str(seed)
    return [
        arkd_train,
        f"config={config}",
        f"seed={seed}",
        *extra,
        f"hydra.run.dir={run_dir}",
        "trainer.progress=false",
    ]


def _run(cmd: list[str], run_dir: Path) -> tuple[str, float, int]:
    if (run_dir / "report.json").is_file():
        return str(run_dir), 0.0, 0
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        code = subprocess.call(["nice", "-n", "5", *cmd], stdout=log, stderr=subprocess.STDOUT)
    return str(run_dir), time.time() - started, code


CHAIN_SEEDS = (100, 101, 102, 103, 104)


def _carry(args: argparse.Namespace) -> None:
    """The chain (in order, one run at a time), then the carried arms (``args.workers`` at a time)."""
    previous: Path | None = None
    for seed in CHAIN_SEEDS:
        run_dir = args.out.with_name(f"{args.out.name}_chain") / str(seed)
        extra = ["policy=learned", "reward=horizon", "label=chain"]
        extra += [f"policy.init_from={previous}"] if previous is not None else []
        code = _run(_command(args.config, run_dir.parent, ".", seed, extra), run_dir)[2]
        print(f"{run_dir}: exit {code}", flush=True)
        previous = run_dir
    carried = ["policy=learned", "reward=horizon", f"policy.init_from={previous}"]
    arms = {
        "learned_horizon_carried": [*carried, "label=learned_horizon_carried"],
        "learned_horizon_carried_frozen": [*carried, "policy.lr=0", "label=learned_horizon_carried_frozen"],
    }
    jobs = [(_command(args.config, args.out, a, s, arms[a]), args.out / a / str(s)) for s in args.seeds for a in arms]
    with ThreadPoolExecutor(args.workers) as pool:
        for run_dir, seconds, code in pool.map(lambda job: _run(*job), jobs):
            print(f"{run_dir}: exit {code}, {seconds:.0f} s", flush=True)


def _mean_alpha(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    alphas = [r["alpha_mean"] for r in rows if r.get("split") is None and isinstance(r.get("alpha_mean"), float)]
    return sum(alphas) / len(alphas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the testbed: tiny_tradeoff or tiny")
    parser.add_argument("--out", required=True, type=Path, help="the sweep directory (one folder per arm and seed)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), help=f"a subset of {list(ARMS)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-controls", action="store_true", help="skip constant_at_horizon_mean")
    parser.add_argument("--carry", action="store_true", help="the carried policy's chain and arms (policy.init_from)")
    args = parser.parse_args()
    if args.carry:
        _carry(args)
        return

    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(args.workers) as pool:
        futures = [
            pool.submit(_run, _command(args.config, args.out, a, s, ARMS[a]), args.out / a / str(s)) for a, s in jobs
        ]
        for future in futures:
            run_dir, seconds, code = future.result()
            print(f"{run_dir}: exit {code}, {seconds:.0f} s", flush=True)
    if args.no_controls:
        return
    controls = []
    for seed in args.seeds:
        source = args.out / "learned_horizon" / str(seed)
        if not (source / "metrics.jsonl").is_file():
            continue
        alpha = min(1.0, max(0.0, _mean_alpha(source)))
        print(f"constant_at_horizon_mean seed {seed}: alpha {alpha:.4f}", flush=True)
        extra = ["policy=constant", f"policy.alpha={alpha:.4f}", "label=constant_at_horizon_mean"]
        run_dir = args.out / "constant_at_horizon_mean" / str(seed)
        controls.append((_command(args.config, args.out, "constant_at_horizon_mean", seed, extra), run_dir))
    with ThreadPoolExecutor(args.workers) as pool:
        for run_dir, seconds, code in pool.map(lambda job: _run(*job), controls):
            print(f"{run_dir}: exit {code}, {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
