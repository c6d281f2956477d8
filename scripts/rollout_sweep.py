"""The rollout sweep of docs/results.md: ``rollout`` x alpha strategy x seeds on the tiny job, then one table.

    python scripts/rollout_sweep.py run --out runs/rollout_sweep            # 5 rollouts x 3 strategies x 3 seeds
    python scripts/rollout_sweep.py run --out runs/rollout_sweep --steps 120 --workers 2   # docs/results.md's run
    python scripts/rollout_sweep.py summarize --out runs/rollout_sweep      # the markdown table
    python scripts/rollout_sweep.py run --config tiny_tradeoff --out runs/rollout_tradeoff --steps 240 \
        --rollouts none gkd_0.5 gkd_1 seqkd distillm                          # docs/results.md's testbed run
    python scripts/rollout_sweep.py summarize --out runs/rollout_tradeoff --metrics fkl rkl tail_recall self_bleu

Every run is ``arkd-train config=tiny`` (``--config``: another experiment, e.g. the testbed) with the cell's
``rollout`` and ``policy`` (fkl, rkl: constant alpha 1 / 0; learned: ARKD), its seed, and the settings every
generating cell shares (``--max-new-tokens``, default 32: the tiny job's validation and report length). A run whose
``report.json`` exists is skipped, so an interrupted sweep continues. ``summarize`` reads each run's ``report.json``
and ``metrics.jsonl``: the student's test Rouge-L after distillation (mean +- std over seeds), its paired difference
from ``rollout=none`` with the same strategy and seed (mean and a 95% Student-t interval), the share of sequences the
student generated, generation's share of the training time and the wall time per optimiser step; ``--metrics`` adds
other student-after metrics of the report as columns (means).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROLLOUTS = {
    "none": [],
    "gkd_0.5": ["rollout=gkd", "rollout.lmbda=0.5"],
    "gkd_1": ["rollout=gkd", "rollout.lmbda=1"],
    "seqkd": ["rollout=seqkd"],
    "distillm": ["rollout=distillm"],
    # a sensitivity cell: DistiLLM's rule with a smaller loss_eps (the paper's 0.1 never fired on tiny)
    "distillm_eps0.02": ["rollout=distillm", "rollout.loss_eps=0.02"],
}
POLICIES = ("fkl", "rkl", "learned")


def _run_dir(out: Path, rollout: str, policy: str, seed: int) -> Path:
    return out / rollout / policy / f"seed{seed}"


def run(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor

    arkd_train = str(Path(sys.executable).with_name("arkd-train"))
    commands = []
    for seed in args.seeds:
        for rollout, overrides in ROLLOUTS.items():
            if args.rollouts and rollout not in args.rollouts:
                continue
            for policy in POLICIES:
                run_dir = _run_dir(args.out, rollout, policy, seed)
                if (run_dir / "report.json").is_file():
                    continue
                shared = [f"rollout.max_new_tokens={args.max_new_tokens}"] if overrides else []
                cmd = [arkd_train, f"config={args.config}", *overrides, *shared, f"policy={policy}", f"seed={seed}"]
                cmd += ["reward=paired"]  # the reward the published sweep ran with (the default then)
                cmd += [f"label={rollout}-{policy}", "trainer.progress=false", f"hydra.run.dir={run_dir}"]
                cmd += [f"report.seeds={args.report_seeds}"] if args.report_seeds else []
                cmd += [f"trainer.max_steps={args.steps}"] if args.steps else []
                commands.append(cmd)

    def one(cmd: list[str]) -> None:
        run_dir = next(c.split("=", 1)[1] for c in cmd if c.startswith("hydra.run.dir="))
        if (Path(run_dir) / "report.json").is_file():
            return  # finished by another runner of the same sweep meanwhile
        print(" ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=args.workers) as pool:  # in order: whole seeds finish first
        list(pool.map(one, commands))


def _t_interval(values: list[float]) -> tuple[float, float]:
    from arkd.evaluation.stats import paired_difference

    result = paired_difference(values, [0.0] * len(values))
    return result.low, result.high


def summarize(args: argparse.Namespace) -> None:
    from arkd.run_log import read_metrics

    table: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for rollout in ROLLOUTS:
        for policy in POLICIES:
            for seed in args.seeds:
                run_dir = _run_dir(args.out, rollout, policy, seed)
                report_file = run_dir / "report.json"
                if not report_file.is_file():
                    continue
                report = json.loads(report_file.read_text())
                training = report["training"]
                rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") != "validation"]
                fractions = [r["rollout_student_fraction"] for r in rows if "rollout_student_fraction" in r]
                last = rows[-1] if rows else {}
                after = report["results"]["student_after"]
                table.setdefault((rollout, policy), {})[seed] = {
                    **{m: after[m]["mean"] for m in args.metrics if m in after},
                    "rougeL": after["rougeL"]["mean"],
                    "before": report["results"]["student_before"]["rougeL"]["mean"],
                    "student": statistics.fmean(fractions) if fractions else float("nan"),
                    "share": training.get("rollout_share") or 0.0,
                    "step_ms": 1000 * training["train_seconds"] / max(training["steps"], 1),
                    "probability": last.get("rollout_probability"),
                }
    extra = "".join(f" {m} |" for m in args.metrics)
    print(
        "| rollout | strategy | seeds | Rouge-L after | vs none (paired, 95% CI) |" + extra + " student-generated | "
        "generation share | ms / step |"
    )
    print("|---|---|---|---|---|" + "---|" * len(args.metrics) + "---|---|---|")
    for (rollout, policy), runs in table.items():
        seeds = sorted(runs)
        scores = [runs[s]["rougeL"] for s in seeds]
        mean = statistics.fmean(scores)
        std = statistics.stdev(scores) if len(scores) > 1 else float("nan")
        base = table.get(("none", policy), {})
        diffs = [runs[s]["rougeL"] - base[s]["rougeL"] for s in seeds if s in base]
        if rollout == "none" or len(diffs) < 2:
            paired = "—"
        else:
            low, high = _t_interval(diffs)
            paired = f"{statistics.fmean(diffs):+.2f} [{low:+.2f}, {high:+.2f}]"
        student = statistics.fmean(runs[s]["student"] for s in seeds)
        share = statistics.fmean(runs[s]["share"] for s in seeds)
        step_ms = statistics.median(runs[s]["step_ms"] for s in seeds)
        probability = [runs[s]["probability"] for s in seeds if runs[s]["probability"] is not None]
        note = f" (final p {', '.join(f'{p:.1f}' for p in probability)})" if probability else ""
        cells = "".join(
            f" {statistics.fmean(runs[s][m] for s in seeds):.3g} |" if all(m in runs[s] for s in seeds) else " — |"
            for m in args.metrics
        )
        print(
            f"| {rollout} | {policy} | {len(seeds)} | {mean:.2f} ± {std:.2f} | {paired} |{cells} "
            f"{100 * student:.0f}%{note} "
            f"| {100 * share:.1f}% | {step_ms:.0f} |"
        )
    befores = [r["before"] for runs in table.values() for r in runs.values()]
    if befores and not any(math.isnan(b) for b in befores):
        print(f"\nStudent before distillation: {statistics.fmean(befores):.2f} Rouge-L (the SFT'd student).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "summarize"))
    parser.add_argument("--out", type=Path, default=Path("runs/rollout_sweep"))
    parser.add_argument("--config", default="tiny", help="the experiment (tiny, or tiny_tradeoff: the testbed)")
    parser.add_argument(
        "--metrics", nargs="*", default=[], help="summarize: more student-after metrics as columns (e.g. tail_recall)"
    )
    parser.add_argument("--report-seeds", default=None, help="report.seeds for every run, e.g. [10,20]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the tiny job's 240)")
    parser.add_argument("--workers", type=int, default=1, help="runs at once")
    parser.add_argument("--rollouts", nargs="+", default=None, help="only these cells (names of ROLLOUTS)")
    args = parser.parse_args()
    (run if args.command == "run" else summarize)(args)


if __name__ == "__main__":
    main()
