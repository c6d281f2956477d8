"""Aggregate several arkd-eval runs (strategies x datasets) into markdown tables and heatmaps (paper Figure 3).

    python scripts/aggregate_results.py runs/eval/fkl runs/eval/rkl runs/eval/arkd --out runs/aggregate
    python scripts/aggregate_results.py RUN... --labels FKL RKL ARKD --metrics rougeL bertscore_f1

Each run directory holds the ``results.json`` that arkd-eval wrote; a run's row label is its ``label`` (or the one
given with ``--labels``). Writes ``aggregate.md`` (one table per metric, mean ± std over seeds), ``records.json``
(the tidy records: one per run, dataset and metric, with per-seed values) and ``heatmap_<metric>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="arkd-eval run directories (or results.json files)")
    parser.add_argument("--labels", nargs="+", help="row names, one per run (default: each run's label)")
    parser.add_argument("--metrics", nargs="+", default=["rougeL"], help="rougeL, exact_match, bertscore_f1, ...")
    parser.add_argument("--out", default="runs/aggregate", help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from arkd.evaluation.plots import plot_heatmap
    from arkd.evaluation.reports import METRIC_TITLES, load_result_records, records_table, table_markdown

    args = parse_args(argv)
    try:
        records = load_result_records(args.runs, labels=args.labels)
    except (FileNotFoundError, ValueError) as err:
        print(f"aggregate_results: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"# Aggregate of {len(args.runs)} runs\n"]
    for metric in args.metrics:
        try:
            rows, cols, grid = records_table(records, metric)
        except ValueError as err:
            print(f"aggregate_results: {err}", file=sys.stderr)
            return 2
        if not rows:
            print(f"aggregate_results: no run has metric '{metric}'; skipped.", file=sys.stderr)
            continue
        sections.append(f"## {METRIC_TITLES.get(metric, metric)}\n\n" + table_markdown(rows, cols, grid, metric))
        values = [[None if cell is None else cell["mean"] for cell in row] for row in grid]
        plot_heatmap(rows, cols, values, out / f"heatmap_{metric}.png", title=METRIC_TITLES.get(metric, metric))
    (out / "aggregate.md").write_text("\n".join(sections), encoding="utf-8")
    (out / "records.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    print("\n".join(sections))
    print(f"[aggregate_results] wrote {out / 'aggregate.md'}, records.json and the heatmaps in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
