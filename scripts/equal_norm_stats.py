"""Does ``equal_norm`` remove the preference of the same-batch reward for the longer (RKL) gradient?

Reads a sweep of runs that logged the alpha-signal probe with ``probe.equal_norm=false,true`` and prints, for each
setting, the probe slopes pooled over runs (mean, one-sample t, share of positive slopes) on the step's own batch and
on the next batch, and the same-batch t of each seed. A positive slope favours FKL (higher alpha), a negative one RKL.

    arkd-train -m config=tiny data.batch_size=32 seed=0,1,2,3,4 policy=constant probe.enabled=true probe.interval=4 \\
        probe.equal_norm=false,true trainer.max_grad_norm=null hydra.sweep.dir=multirun/equal_norm_noclip
    python scripts/equal_norm_stats.py multirun/equal_norm_noclip
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arkd.policy.probe import t_value
from arkd.run_log import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path)
    args = parser.parse_args()
    runs: dict[tuple[int, bool], tuple[list[float], list[float]]] = {}
    for report in sorted(args.sweep.rglob("report.json")):
        cfg = json.loads(report.read_text())["config"]
        rows = read_metrics(report.parent / "metrics.jsonl")
        rows = [r for r in rows if r.get("split", "train") == "train" and r.get("alpha_signal_slope") is not None]
        same = [r["alpha_signal_slope_same"] for r in rows]
        runs[(cfg["seed"], bool(cfg["probe"]["equal_norm"]))] = (same, [r["alpha_signal_slope"] for r in rows])
    if not runs:
        raise SystemExit(f"equal_norm_stats: no run with probe slopes under {args.sweep}")
    for setting in (False, True):
        chosen = {seed: v for (seed, eq), v in sorted(runs.items()) if eq == setting}
        if not chosen:
            continue
        same = [x for a, _ in chosen.values() for x in a]
        nxt = [x for _, b in chosen.values() for x in b]
        print(
            f"equal_norm={setting}: {len(same)} probes; same batch mean {sum(same) / len(same):+.2e} "
            f"t {t_value(same):+.2f} share>0 {sum(v > 0 for v in same) / len(same):.2f}; "
            f"next batch mean {sum(nxt) / len(nxt):+.2e} "
            f"t {t_value(nxt):+.2f} share>0 {sum(v > 0 for v in nxt) / len(nxt):.2f}"
        )
        print("   per seed same-batch t:", [round(t_value(a), 2) for a, _ in chosen.values()])


if __name__ == "__main__":
    main()
