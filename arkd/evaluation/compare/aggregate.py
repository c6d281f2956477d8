"""The aggregation of tidy records: per-strategy tables over seeds, paired differences against the reference strategy
(Holm over each dataset's comparisons), Friedman's omnibus test, per-seed ranks, the reference models, and the whole
comparison as one dict (:func:`aggregate`). The statistics themselves are :mod:`arkd.evaluation.stats`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from arkd.evaluation.results import HIGHER_IS_BETTER
from arkd.evaluation.stats import (
    friedman,
    holm_adjust,
    holm_levels,
    mean_std,
    paired_difference,
    paired_t_p_value,
    ranks_within_blocks,
)

from .records import _METRIC_ORDER

# The two controls of a strategy matrix (docs/results.md), by the label their runs are given, and what each measures.
CONTROLS = {
    "learned_frozen": "A/A noise floor: the learned policy frozen at its initial output (policy.lr=0)",
    "constant_at_learned_mean": "adapting control: does adapting matter? a constant alpha at the learned runs' mean",
    "learned_horizon_frozen": (
        "selection control of the horizon reward: the same branches and best-branch continuation with the policy "
        "frozen (policy.lr=0): what picking the better branch gives without learning"
    ),
    "constant_at_horizon_mean": (
        "adapting control of the horizon reward: a constant alpha at the learned_horizon runs' mean"
    ),
}


def control_role(strategy: str) -> str | None:
    """What a control run measures (:data:`CONTROLS`), for a control's label or an unlabelled ``learned[lr=0]`` run;
    None for any other strategy."""
    if strategy in CONTROLS:
        return CONTROLS[strategy]
    if strategy.startswith("learned[") and any(
        part.strip() in ("lr=0", "lr=0.0") for part in strategy[len("learned[") : -1].split(",")
    ):
        return CONTROLS["learned_frozen"]
    return None


def _ordered(values: Iterable[Any], order: Sequence[Any] = ()) -> list[Any]:
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    first = [v for v in order if v in seen]
    return first + [v for v in seen if v not in first]


def summary_table(
    records: Sequence[dict[str, Any]], metric: str = "rougeL", *, model: str = "student_after"
) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean and sample std over seeds of ``metric`` per strategy and dataset.

    Args:
        records: tidy records (:func:`load_run_records`).
        metric: ``rougeL``, ``exact_match``, ``bertscore_f1``, ...
        model: which model's scores (``student_after`` compares the strategies; ``teacher`` and ``student_before``
            give the reference points, one value per seed).

    Returns:
        ``{strategy: {dataset: {"mean", "std", "n", "seeds", "values"}}}`` with ``values`` in the order of ``seeds``
        (ascending) and ``std`` 0.0 for a single seed. Strategies and datasets keep the records' order.
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        if record["metric"] != metric or record["model"] != model:
            continue
        cell = table.setdefault(record["strategy"], {}).setdefault(record["dataset"], {})
        cell.setdefault("by_seed", {})[record["seed"]] = record["value"]
    for row in table.values():
        for cell in row.values():
            by_seed = cell.pop("by_seed")
            seeds = sorted(by_seed)
            values = [by_seed[s] for s in seeds]
            mean, std = mean_std(values)
            cell.update(mean=mean, std=std, n=len(values), seeds=seeds, values=values)
    return table


def paired_differences(
    records: Sequence[dict[str, Any]],
    metric: str = "rougeL",
    *,
    reference: str = "learned",
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """``reference - other`` for every other strategy and dataset, paired over the seeds both ran.

    Returns:
        One dict per (strategy, dataset): ``strategy``, ``dataset``, ``seeds`` (the shared ones), ``n``, ``mean``,
        ``std`` (of the per-seed differences), ``low`` / ``high`` (the two-sided Student-t interval; NaN for a single
        seed), ``confidence`` and ``significant`` (the interval excludes 0). Empty when ``reference`` has no run.
    """
    table = summary_table(records, metric)
    if reference not in table:
        return []
    out = []
    for strategy, row in table.items():
        if strategy == reference:
            continue
        for dataset, cell in row.items():
            ref_cell = table[reference].get(dataset)
            if ref_cell is None:
                continue
            ref = dict(zip(ref_cell["seeds"], ref_cell["values"]))
            other = dict(zip(cell["seeds"], cell["values"]))
            seeds = sorted(set(ref) & set(other))
            if not seeds:
                continue
            a, b = [ref[s] for s in seeds], [other[s] for s in seeds]
            diff = paired_difference(a, b, confidence=confidence)
            out.append(
                {
                    "strategy": strategy,
                    "dataset": dataset,
                    "seeds": seeds,
                    "n": diff.n,
                    "mean": diff.mean,
                    "std": diff.std,
                    "low": diff.low,
                    "high": diff.high,
                    "confidence": diff.confidence,
                    "significant": diff.significant,
                    "p_value": paired_t_p_value(a, b),
                    "_pair": (a, b),
                }
            )
    _add_holm(out, confidence)
    for d in out:
        del d["_pair"]
    return out


def _add_holm(out: list[dict[str, Any]], confidence: float) -> None:
    """Holm over the comparisons of each dataset: adjusted p values and intervals at each comparison's Holm level."""
    for dataset in {d["dataset"] for d in out}:
        group = [d for d in out if d["dataset"] == dataset]
        ps = [d["p_value"] for d in group]
        alpha = 1.0 - confidence
        for d, adjusted, level in zip(group, holm_adjust(ps), holm_levels(ps, alpha)):
            d["holm_p"] = adjusted
            d["holm_level"] = level
            if math.isnan(level):
                d["holm_low"] = d["holm_high"] = math.nan
            else:
                wide = paired_difference(*d["_pair"], confidence=1.0 - level)
                d["holm_low"], d["holm_high"] = wide.low, wide.high
            d["holm_significant"] = bool(d["n"] > 1 and not math.isnan(adjusted) and adjusted < alpha)


def _complete_blocks(table: dict[str, dict[str, dict[str, Any]]], dataset: str) -> tuple[list[str], list[int]]:
    """The strategies with a score on ``dataset`` and the seeds every one of them ran."""
    strategies = [s for s, row in table.items() if dataset in row]
    if not strategies:
        return [], []
    seeds = set(table[strategies[0]][dataset]["seeds"])
    for s in strategies[1:]:
        seeds &= set(table[s][dataset]["seeds"])
    return strategies, sorted(seeds)


def _matrix(table, dataset: str, strategies: Sequence[str], seeds: Sequence[int]) -> list[list[float]]:
    cells = {s: dict(zip(table[s][dataset]["seeds"], table[s][dataset]["values"])) for s in strategies}
    return [[cells[s][seed] for s in strategies] for seed in seeds]


def omnibus_tests(records: Sequence[dict[str, Any]], metric: str = "rougeL") -> dict[str, dict[str, Any]]:
    """Friedman's test over strategies x seeds of ``metric``, per dataset (the seeds every strategy ran).

    Returns:
        ``{dataset: {"test": "friedman", "statistic", "p_value", "n_strategies", "n_seeds", "strategies",
        "seeds"}}``; a dataset with fewer than 3 strategies or 2 shared seeds gets ``statistic`` and ``p_value``
        None and a ``note``.
    """
    table = summary_table(records, metric)
    out = {}
    for dataset in _ordered(d for row in table.values() for d in row):
        strategies, seeds = _complete_blocks(table, dataset)
        base = {"strategies": strategies, "seeds": seeds}
        try:
            result = friedman(_matrix(table, dataset, strategies, seeds)).to_dict()
        except ValueError as err:
            result = {
                "test": "friedman",
                "statistic": None,
                "p_value": None,
                "n_strategies": len(strategies),
                "n_seeds": len(seeds),
                "note": str(err),
            }
        out[dataset] = {**result, **base}
    return out


def per_seed_ranks(records: Sequence[dict[str, Any]], metric: str = "rougeL") -> dict[str, dict[str, Any]]:
    """Each strategy's rank on every seed (1 = best; ties share their mean rank), per dataset, over the seeds every
    strategy ran. "Best" is the higher value, except for fkl and rkl (lower is better); for a trade-off metric
    (head / tail recall, distinct-n, self-BLEU), rank 1 is simply the highest value.

    Returns:
        ``{dataset: {"seeds", "higher_is_better", "ranks": {strategy: [rank per seed]}, "mean_rank": {strategy:
        mean}}}``.
    """
    table = summary_table(records, metric)
    higher = HIGHER_IS_BETTER.get(metric, True)
    out = {}
    for dataset in _ordered(d for row in table.values() for d in row):
        strategies, seeds = _complete_blocks(table, dataset)
        if not seeds:
            continue
        ranks = ranks_within_blocks(_matrix(table, dataset, strategies, seeds), higher_is_better=higher)
        by_strategy = {s: [ranks[i][j] for i in range(len(seeds))] for j, s in enumerate(strategies)}
        out[dataset] = {
            "seeds": seeds,
            "higher_is_better": HIGHER_IS_BETTER.get(metric),
            "ranks": by_strategy,
            "mean_rank": {s: math.fsum(r) / len(r) for s, r in by_strategy.items()},
        }
    return out


def reference_models(records: Sequence[dict[str, Any]], metric: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The student before distillation and the teacher on ``metric``: ``{model: {dataset: {"mean", "std", "n",
    "seeds", "values"}}}``. They do not depend on the strategy: each seed's value is the mean over the strategies'
    runs of that seed."""
    models = {}
    for model in ("student_before", "teacher"):
        pooled: dict[str, dict[int, list[float]]] = {}
        for r in records:
            if r["metric"] == metric and r["model"] == model:
                pooled.setdefault(r["dataset"], {}).setdefault(r["seed"], []).append(r["value"])
        cells = {}
        for dataset, by_seed in pooled.items():
            seeds = sorted(by_seed)
            values = [math.fsum(by_seed[s]) / len(by_seed[s]) for s in seeds]
            mean, std = mean_std(values)
            cells[dataset] = {"mean": mean, "std": std, "n": len(values), "seeds": seeds, "values": values}
        models[model] = cells
    return models


def select_metrics(records: Sequence[dict[str, Any]], metrics: Sequence[str] | None) -> Sequence[str]:
    """The metrics to compare: ``metrics`` (each must be present), or all present, in the report order.

    Raises:
        ValueError: a metric of ``metrics`` that no run has.
    """
    present = {r["metric"] for r in records if r["model"] == "student_after"}
    if metrics is None:
        return [m for m in _METRIC_ORDER if m in present] + sorted(present - set(_METRIC_ORDER))
    missing = [m for m in metrics if m not in present]
    if missing:
        raise ValueError(f"no run has metric(s) {', '.join(missing)}; the runs have: {', '.join(sorted(present))}.")
    return metrics


def aggregate(
    records: list[dict[str, Any]],
    incomplete: Sequence[Path],
    metrics: Sequence[str],
    *,
    reference: str,
    confidence: float,
    order: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole comparison of ``records`` on ``metrics`` as the dict :func:`arkd.evaluation.compare.compare` returns
    (``figures`` still empty)."""
    strategies = _ordered((r["strategy"] for r in records), order)
    rank = {s: i for i, s in enumerate(strategies)}
    tables, datasets, differences = {}, {}, {}
    for metric in metrics:
        table = summary_table(records, metric)
        tables[metric] = {s: table[s] for s in sorted(table, key=rank.__getitem__)}
        datasets[metric] = _ordered(d for row in table.values() for d in row)
        differences[metric] = sorted(
            paired_differences(records, metric, reference=reference, confidence=confidence),
            key=lambda d: (rank[d["strategy"]], d["dataset"]),
        )
    omnibus_by_dataset = {metric: omnibus_tests(records, metric) for metric in metrics}
    return {
        "reference": reference,
        "confidence": confidence,
        "metrics": list(metrics),
        "strategies": strategies,
        "seeds": sorted({r["seed"] for r in records}),
        "datasets": datasets,
        "tables": tables,
        "reference_models": {metric: reference_models(records, metric) for metric in metrics},
        "differences": differences,
        # Friedman over strategies x seeds, reported before any pairwise difference: per metric the first dataset's
        # test ({"test": "friedman", "statistic", "p_value", "n_strategies", "n_seeds", ...}); all in
        # omnibus_by_dataset.
        "omnibus": {
            metric: {**next(iter(by.values())), "dataset": next(iter(by))}
            for metric, by in omnibus_by_dataset.items()
            if by
        },
        "omnibus_by_dataset": omnibus_by_dataset,
        "ranks": {metric: per_seed_ranks(records, metric) for metric in metrics},
        "controls": {s: control_role(s) for s in strategies if control_role(s)},
        "records": records,
        "runs": sorted({r["run"] for r in records}),
        "incomplete": [str(p) for p in incomplete],
        "figures": {},
    }
