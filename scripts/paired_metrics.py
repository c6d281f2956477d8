"""Two strategies of an arkd-compare result, paired by seed on every metric: ``A - B`` with its t interval, p value,
and Holm's correction over the metrics (the trade-off test of docs/results.md: do FKL and RKL differ, and in opposite
directions on different metrics?).

    python scripts/paired_metrics.py results/x/comparison.json fkl rkl [--dataset NAME] [--out FILE]
    python scripts/paired_metrics.py results/x/comparison.json --correlate rougeL   # Spearman over every run

``--correlate METRIC`` instead prints Spearman's rank correlation, over every run of every strategy (the student
after distillation), between METRIC and each other metric: a description of where runs land, not a paired test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arkd.evaluation.results import METRIC_TITLES
from arkd.evaluation.stats import holm_adjust, paired_difference, paired_t_p_value


def paired_metrics(comparison: dict, a: str, b: str, dataset: str | None = None) -> str:
    rows = []
    for metric in comparison["metrics"]:
        table = comparison["tables"][metric]
        if a not in table or b not in table:
            continue
        name = dataset or next(iter(table[a]))
        cell_a, cell_b = table[a].get(name), table[b].get(name)
        if cell_a is None or cell_b is None:
            continue
        va, vb = dict(zip(cell_a["seeds"], cell_a["values"])), dict(zip(cell_b["seeds"], cell_b["values"]))
        seeds = sorted(set(va) & set(vb))
        xa, xb = [va[s] for s in seeds], [vb[s] for s in seeds]
        d = paired_difference(xa, xb)
        wins = sum(x > y for x, y in zip(xa, xb))
        rows.append((metric, cell_a["mean"], cell_b["mean"], d, paired_t_p_value(xa, xb), wins, len(seeds)))
    holm = holm_adjust([r[4] for r in rows])
    lines = [
        f"`{a}` − `{b}`, paired by seed; 95 % t interval; Holm over the {len(rows)} metrics.",
        "",
        f"| metric | {a} | {b} | {a} − {b} | 95 % interval | {a} > {b} on seeds | p | Holm p |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for (metric, ma, mb, d, p, wins, n), hp in zip(rows, holm):
        lines.append(
            f"| {METRIC_TITLES.get(metric, metric)} | {ma:.4g} | {mb:.4g} | {d.mean:+.4g} | "
            f"[{d.low:+.4g}, {d.high:+.4g}] | {wins} / {n} | {p:.4f} | {hp:.4f} |"
        )
    return "\n".join(lines) + "\n"


def run_correlations(comparison: dict, metric: str) -> str:
    from scipy.stats import spearmanr

    runs: dict[tuple, dict[str, float]] = {}
    for r in comparison["records"]:
        if r["model"] == "student_after":
            runs.setdefault((r["strategy"], r["seed"], r["dataset"]), {})[r["metric"]] = r["value"]
    lines = [f"Spearman's rho between {metric} and each metric over the runs (strategies and seeds pooled).", ""]
    lines += ["| metric | runs | rho | p |", "|---|---:|---:|---:|"]
    for other in comparison["metrics"]:
        if other == metric:
            continue
        pairs = [(v[metric], v[other]) for v in runs.values() if metric in v and other in v]
        rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
        lines.append(f"| {METRIC_TITLES.get(other, other)} | {len(pairs)} | {rho:+.3f} | {p:.2g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comparison", type=Path, help="an arkd-compare comparison.json")
    parser.add_argument("a", nargs="?")
    parser.add_argument("b", nargs="?")
    parser.add_argument("--correlate", default=None, metavar="METRIC", help="Spearman of METRIC against the others")
    parser.add_argument("--dataset", default=None, help="the dataset (default: each metric's first)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    comparison = json.loads(args.comparison.read_text())
    if args.correlate:
        text = run_correlations(comparison, args.correlate)
    elif args.a and args.b:
        text = paired_metrics(comparison, args.a, args.b, args.dataset)
    else:
        parser.error("give two strategies A B, or --correlate METRIC")
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
