"""Figures: the alpha trajectory (paper Figure 5), reward / FKL / RKL dynamics (Figure 6), strategy x dataset heatmap
(Figure 3). All use matplotlib's Agg backend and write PNG files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _training_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("split", "train") == "train" and isinstance(r.get("step"), int | float)]


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where ``key`` holds a finite number."""
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(float(row["step"]))
            values.append(float(value))
    return steps, values


def plot_alpha_trajectory(rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Plot ``alpha_mean`` over training steps with a ± ``alpha_std`` band (paper Figure 5), and below it the
    alpha-signal probe's slope (``alpha_signal_slope``, next batch; ``alpha_signal_slope_same``) and the horizon
    probe's (``alpha_signal_horizon_slope``, on its own axis) when logged.

    Args:
        rows: ``metrics.jsonl`` rows (validation rows are ignored).
        path: the PNG to write.
        title: figure title.

    Returns:
        The written path.

    Raises:
        ValueError: no training row carries a numeric ``alpha_mean``.
    """
    train = _training_rows(rows)
    steps, means = _series(train, "alpha_mean")
    if not steps:
        raise ValueError("no training row has a numeric 'alpha_mean'; expected the metrics.jsonl of a training run.")
    stds = {float(r["step"]): r.get("alpha_std") for r in train}
    low = [m - (stds.get(s) or 0.0) for s, m in zip(steps, means)]
    high = [m + (stds.get(s) or 0.0) for s, m in zip(steps, means)]
    probe_steps, slopes = _series(train, "alpha_signal_slope")
    far_steps, far = _series(train, "alpha_signal_horizon_slope")
    plt = _pyplot()
    if probe_steps or far_steps:
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.fill_between(steps, [max(0.0, v) for v in low], [min(1.0, v) for v in high], alpha=0.25, label="± std")
    ax.plot(steps, means, lw=1.6, label="alpha mean")
    ax.set_ylabel("alpha (weight of FKL)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(title or "alpha trajectory")
    if probe_steps or far_steps:
        # the alpha-signal probe: d reward / d alpha after one step on the next batch (and on the step's own batch);
        # the horizon probe's after H real steps on the reward split, on its own axis (a larger scale)
        bx.axhline(0.0, color="0.4", lw=0.8)
        if probe_steps:
            bx.plot(probe_steps, slopes, "o-", ms=3, lw=1.0, label="one step, next batch")
        same_steps, same = _series(train, "alpha_signal_slope_same")
        if same_steps:
            bx.plot(same_steps, same, "s--", ms=2.5, lw=0.8, alpha=0.7, label="one step, same batch")
        bx.set_ylabel("alpha signal (nats / unit alpha)")
        bx.grid(alpha=0.3)
        bx.legend(loc="upper left", fontsize=8)
        if far_steps:
            horizon = next(int(r["alpha_signal_horizon"]) for r in train if r.get("alpha_signal_horizon"))
            cx = bx.twinx()
            cx.axhline(0.0, color="C3", lw=0.6, ls=":")
            cx.plot(far_steps, far, "D-", color="C3", ms=4, lw=1.2, label=f"after {horizon} steps, reward split")
            cx.set_ylabel(f"{horizon}-step signal", color="C3")
            cx.legend(loc="upper right", fontsize=8)
        ax = bx
    ax.set_xlabel("step")
    return _save(fig, path)


def plot_dynamics(rows: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Plot reward, FKL and RKL over training steps, one panel each (paper Figure 6).

    Panels without any numeric value (e.g. ``reward`` of a strategy that computes none) say so instead of a line.

    Raises:
        ValueError: none of ``reward``, ``fkl``, ``rkl`` has a numeric value.
    """
    train = _training_rows(rows)
    keys = (("reward", "immediate reward"), ("fkl", "FKL"), ("rkl", "RKL"))
    series = {key: _series(train, key) for key, _ in keys}
    if not any(steps for steps, _ in series.values()):
        raise ValueError("no training row has a numeric 'reward', 'fkl' or 'rkl'; expected a training metrics.jsonl.")
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 7.2), sharex=True)
    for ax, (key, name) in zip(axes, keys):
        steps, values = series[key]
        if steps:
            ax.plot(steps, values, lw=1.2)
        else:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title or "training dynamics")
    return _save(fig, path)


def plot_heatmap(
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    values: Sequence[Sequence[float | None]],
    path: str | os.PathLike,
    *,
    title: str = "Rouge-L",
    cmap: str = "viridis",
) -> Path:
    """A strategy x dataset heatmap with the value in each cell (paper Figure 3); None cells are blank.

    Args:
        row_labels: ``R`` strategy names.
        col_labels: ``C`` dataset names.
        values: ``R x C`` numbers (None: missing).
        path: the PNG to write.
        title: colour bar / figure title.
        cmap: matplotlib colour map.
    """
    import numpy as np

    if len(values) != len(row_labels) or any(len(r) != len(col_labels) for r in values):
        raise ValueError(
            f"values must be {len(row_labels)} rows x {len(col_labels)} columns to match the labels; got "
            f"{[len(r) for r in values]}."
        )
    grid = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    if np.isnan(grid).all():
        raise ValueError("the heatmap has no value; expected at least one number.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.4 * len(col_labels) + 2.5, 0.55 * len(row_labels) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    low, high = np.nanmin(grid), np.nanmax(grid)
    middle = (low + high) / 2
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                color = "black" if grid[i, j] > middle else "white"
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color=color, fontsize=9)
    fig.colorbar(image, ax=ax, label=title)
    ax.set_title(title)
    return _save(fig, path)


def plot_metric_heatmap(
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    values: Sequence[Sequence[float | None]],
    path: str | os.PathLike,
    *,
    higher_is_better: Sequence[bool | None] | None = None,
    title: str = "strategy x metric (mean over seeds)",
) -> Path:
    """A strategy x metric heatmap: each cell shows the metric's value; its colour is the value scaled within its
    column (0: the column's worst or lowest, 1: its best or highest), since the metrics have different scales.

    Args:
        row_labels: ``R`` strategy names.
        col_labels: ``C`` metric names.
        values: ``R x C`` numbers (None: missing).
        path: the PNG to write.
        higher_is_better: per column, True / False orients the colour so that bright is better; None (a trade-off
            metric such as tail recall or distinct-n): bright is higher.
        title: the figure title.
    """
    import numpy as np

    if len(values) != len(row_labels) or any(len(r) != len(col_labels) for r in values):
        raise ValueError(
            f"values must be {len(row_labels)} rows x {len(col_labels)} columns to match the labels; got "
            f"{[len(r) for r in values]}."
        )
    directions = list(higher_is_better) if higher_is_better is not None else [None] * len(col_labels)
    if len(directions) != len(col_labels):
        raise ValueError(
            f"higher_is_better has {len(directions)} entries; expected one per column ({len(col_labels)})."
        )
    grid = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    if np.isnan(grid).all():
        raise ValueError("the heatmap has no value; expected at least one number.")
    scaled = np.full_like(grid, np.nan)
    for j, direction in enumerate(directions):
        column = grid[:, j]
        if np.isnan(column).all():
            continue
        low, high = np.nanmin(column), np.nanmax(column)
        scaled[:, j] = 0.5 if high == low else (column - low) / (high - low)
        if direction is False:
            scaled[:, j] = 1.0 - scaled[:, j]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.25 * len(col_labels) + 3.0, 0.5 * len(row_labels) + 1.8))
    image = ax.imshow(np.ma.masked_invalid(scaled), cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
    names = [f"{c}\n({'higher' if d else 'lower'} better)" if d is not None else f"{c}\n(trade-off)" for c, d in
             zip(col_labels, directions)]  # fmt: skip
    ax.set_xticks(range(len(col_labels)), labels=names, fontsize=8)
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                color = "black" if scaled[i, j] > 0.5 else "white"
                ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color=color, fontsize=8)
    fig.colorbar(image, ax=ax, label="scaled within the column")
    ax.set_title(title)
    return _save(fig, path)


def plot_head_tail(
    strategies: Sequence[str],
    head: Sequence[tuple[float, float]],
    tail: Sequence[tuple[float, float]],
    path: str | os.PathLike,
    *,
    title: str = "student mass on the teacher's head and tail, relative to the teacher's",
) -> Path:
    """Per strategy the pair (head recall, tail recall), mean ± std over seeds, in two panels with the teacher's
    own value (1.0) marked: modes versus tail at a glance.

    Args:
        strategies: ``S`` names.
        head: ``S`` pairs ``(mean, std)`` of head_recall.
        tail: ``S`` pairs ``(mean, std)`` of tail_recall.
        path: the PNG to write.
        title: the figure title.
    """
    if not (len(strategies) == len(head) == len(tail)) or not strategies:
        raise ValueError(
            f"expected one (mean, std) head and tail pair per strategy; got {len(strategies)} strategies, "
            f"{len(head)} head and {len(tail)} tail pairs."
        )
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 0.4 * len(strategies) + 1.8), sharey=True)
    positions = list(range(len(strategies)))
    for ax, pairs, name in ((axes[0], head, "head recall"), (axes[1], tail, "tail recall")):
        ax.barh(positions, [m for m, _ in pairs], xerr=[sd for _, sd in pairs], color="tab:blue", alpha=0.75)
        ax.axvline(1.0, color="black", ls="--", lw=1, label="teacher (1.0)")
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, labels=list(strategies))
    axes[0].invert_yaxis()
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
