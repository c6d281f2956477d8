"""The comparison's figures: strategy x dataset and strategy x metric heatmaps, head / tail recall, and alpha over
training of several runs in one figure (:func:`plot_alpha_runs`); drawn with :mod:`arkd.evaluation.plots`."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arkd.evaluation.results import HIGHER_IS_BETTER, METRIC_TITLES


def _train_alpha(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    from arkd.run_log import read_metrics

    steps, means, stds = [], [], []
    for row in read_metrics(run_dir / "metrics.jsonl"):
        value = row.get("alpha_mean")
        if row.get("split", "train") != "train" or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        std = row.get("alpha_std")
        steps.append(float(row["step"]))
        means.append(float(value))
        stds.append(float(std) if isinstance(std, int | float) and math.isfinite(std) else 0.0)
    return steps, means, stds


def plot_alpha_runs(
    runs: Sequence[tuple[str, str | os.PathLike]], path: str | os.PathLike, *, title: str = "alpha over training"
) -> Path:
    """Alpha's mean over training of several runs in one figure (one line each, ± its within-batch std as a band).

    For a single run this is :func:`arkd.evaluation.plots.plot_alpha_trajectory` of that run.

    Args:
        runs: ``(label, run_dir)`` pairs; each run's ``metrics.jsonl`` is read.
        path: the PNG to write.
        title: the figure title.

    Raises:
        ValueError: no run logged a numeric ``alpha_mean``.
    """
    from arkd.evaluation.plots import _pyplot, _save, plot_alpha_trajectory
    from arkd.run_log import read_metrics

    if len(runs) == 1:
        return plot_alpha_trajectory(read_metrics(Path(runs[0][1]) / "metrics.jsonl"), path, title=title)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 3.8))
    drawn = 0
    for label, run_dir in runs:
        steps, means, stds = _train_alpha(Path(run_dir))
        if not steps:
            continue
        line = ax.plot(steps, means, lw=1.5, label=label)[0]
        low = [max(0.0, m - s) for m, s in zip(means, stds)]
        high = [min(1.0, m + s) for m, s in zip(means, stds)]
        ax.fill_between(steps, low, high, alpha=0.15, color=line.get_color())
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError("no run logged a numeric 'alpha_mean'; expected metrics.jsonl files of training runs.")
    ax.set_xlabel("step")
    ax.set_ylabel("alpha (weight of FKL)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, ncol=2 if drawn > 4 else 1)
    ax.set_title(title)
    return _save(fig, path)


def _mean_over_datasets(cell_row: dict[str, dict[str, Any]]) -> float:
    return sum(c["mean"] for c in cell_row.values()) / len(cell_row)


def draw_figures(result: dict[str, Any], out: Path) -> None:
    """Draw the comparison's figures into ``out`` and name each in ``result["figures"]``: ``heatmap`` (strategy x
    dataset of the first metric), ``heatmap_metrics`` (strategy x metric), ``head_tail_recall``, ``alpha_trajectory``
    (every ``reference`` run) and ``alpha_strategies`` (one run per strategy), each where its data exist."""
    figures = result["figures"]
    metrics, datasets = result["metrics"], result["datasets"]
    if metrics:
        figures["heatmap"] = str(_dataset_heatmap(result, metrics[0], out / "heatmap.png"))
    main_dataset = {m: datasets[m][0] for m in metrics if datasets[m]}
    shown = [m for m in metrics if m in main_dataset]
    if len(shown) > 1:
        figures["heatmap_metrics"] = str(_metric_heatmap(result, main_dataset, shown, out / "heatmap_metrics.png"))
    if "head_recall" in main_dataset and "tail_recall" in main_dataset:
        path = _head_tail(result, main_dataset, out / "head_tail_recall.png")
        if path is not None:
            figures["head_tail_recall"] = str(path)
    _alpha_figures(result, out)


def _dataset_heatmap(result: dict[str, Any], metric: str, path: Path) -> Path:
    from arkd.evaluation.plots import plot_heatmap

    table = result["tables"][metric]
    rows = sorted(table, key=lambda s: -_mean_over_datasets(table[s]))
    cols = result["datasets"][metric]
    values = [[table[s][d]["mean"] if d in table[s] else None for d in cols] for s in rows]
    title = f"{METRIC_TITLES.get(metric, metric)} (mean over {len(result['seeds'])} seeds)"
    return plot_heatmap(rows, cols, values, path, title=title)


def _metric_heatmap(result: dict[str, Any], main_dataset: dict[str, str], shown: list[str], path: Path) -> Path:
    from arkd.evaluation.plots import plot_metric_heatmap

    tables = result["tables"]
    rows = [s for s in result["strategies"] if all(main_dataset[m] in tables[m].get(s, {}) for m in shown[:1])]
    values = [
        [tables[m][s][main_dataset[m]]["mean"] if main_dataset[m] in tables[m].get(s, {}) else None for m in shown]
        for s in rows
    ]
    return plot_metric_heatmap(
        rows,
        [METRIC_TITLES.get(m, m) for m in shown],
        values,
        path,
        higher_is_better=[HIGHER_IS_BETTER.get(m) for m in shown],
        title=f"strategy x metric on {main_dataset[shown[0]]} (mean over seeds)",
    )


def _head_tail(result: dict[str, Any], main_dataset: dict[str, str], path: Path) -> Path | None:
    from arkd.evaluation.plots import plot_head_tail

    tables = result["tables"]
    both = [
        s
        for s in result["strategies"]
        if main_dataset["head_recall"] in tables["head_recall"].get(s, {})
        and main_dataset["tail_recall"] in tables["tail_recall"].get(s, {})
    ]
    if not both:
        return None
    cells = {m: [tables[m][s][main_dataset[m]] for s in both] for m in ("head_recall", "tail_recall")}
    return plot_head_tail(
        both,
        [(c["mean"], c["std"]) for c in cells["head_recall"]],
        [(c["mean"], c["std"]) for c in cells["tail_recall"]],
        path,
    )


def _alpha_figures(result: dict[str, Any], out: Path) -> None:
    """Alpha over training: every run of the reference strategy, then one run per strategy (its lowest seed)."""
    reference = result["reference"]
    by_strategy: dict[str, dict[int, str]] = {}
    for r in result["records"]:
        by_strategy.setdefault(r["strategy"], {})[r["seed"]] = r["run"]
    if reference in by_strategy:
        runs = [(f"seed {s}", by_strategy[reference][s]) for s in sorted(by_strategy[reference])]
        try:
            path = plot_alpha_runs(runs, out / "alpha_trajectory.png", title=f"{reference}: alpha over training")
            result["figures"]["alpha_trajectory"] = str(path)
        except (FileNotFoundError, ValueError) as err:
            print(f"compare: no alpha trajectory for {reference} ({err})", file=sys.stderr)
    first_runs = [(s, by_strategy[s][min(by_strategy[s])]) for s in result["strategies"]]
    first_runs = [(s, run) for s, run in first_runs if (Path(run) / "metrics.jsonl").is_file()]
    if len(first_runs) > 1:
        try:
            seed = min(result["seeds"])
            path = plot_alpha_runs(
                first_runs, out / "alpha_strategies.png", title=f"alpha over training per strategy (seed {seed})"
            )
            result["figures"]["alpha_strategies"] = str(path)
        except ValueError as err:
            print(f"compare: no per-strategy alpha figure ({err})", file=sys.stderr)
