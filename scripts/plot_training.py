"""Plot a training run's alpha trajectory (paper Figure 5) and reward / FKL / RKL dynamics (Figure 6).

    python scripts/plot_training.py runs/train/arkd                 # reads runs/train/arkd/metrics.jsonl
    python scripts/plot_training.py path/to/metrics.jsonl --out figures/

Writes ``alpha_trajectory.png`` and ``dynamics.png`` (next to the metrics file unless ``--out`` is given). A run
without a logged alpha (or without reward/FKL/RKL) gets the figure it has data for, and a note for the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from arkd.evaluation.plots import plot_alpha_trajectory, plot_dynamics
    from arkd.run_log import read_metrics

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory holding metrics.jsonl, or the metrics.jsonl file")
    parser.add_argument("--out", help="output folder (default: beside metrics.jsonl)")
    parser.add_argument("--title", default=None, help="prefix for the figure titles")
    args = parser.parse_args(argv)
    path = Path(args.run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    try:
        rows = read_metrics(path)
    except (FileNotFoundError, ValueError) as err:
        print(f"plot_training: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else path.parent
    prefix = f"{args.title}: " if args.title else ""
    written = 0
    for name, plot, title in (
        ("alpha_trajectory.png", plot_alpha_trajectory, "alpha trajectory"),
        ("dynamics.png", plot_dynamics, "reward / FKL / RKL"),
    ):
        try:
            target = plot(rows, out / name, title=prefix + title)
        except ValueError as err:
            print(f"plot_training: {name} skipped: {err}", file=sys.stderr)
            continue
        print(f"[plot_training] wrote {target}")
        written += 1
    return 0 if written else 2


if __name__ == "__main__":
    sys.exit(main())
