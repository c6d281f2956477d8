"""Compare alpha strategies over seeds: run directories of an ``arkd-train -m`` matrix -> table, paired differences,
heatmap and the learned policy's alpha trajectory.

A matrix is one Hydra multirun, e.g.::

    arkd-train -m config=tiny seed=0,1,2 policy=fkl,rkl,constant,linear,cosine,akl,todi,entropy_gated,greedy,learned

Each run directory holds ``report.json`` (written by the final evaluation: teacher, student before and student after
on the test split), ``config.yaml``, ``metrics.jsonl`` and Hydra's ``.hydra/hydra.yaml``. Optionally it also holds
``results.json`` files of ``arkd-eval`` runs (anywhere below it, e.g. ``RUN/eval/results.json``): their datasets and
metrics (BERTScore included) join the run's records.

Everything goes through *tidy records*, one per (run, model, dataset, metric)::

    {"run": "/path/to/run", "strategy": "learned", "seed": 0, "model": "student_after",
     "dataset": "synthetic", "metric": "rougeL", "value": 23.4}

``value`` is the run's score: the mean over the evaluation's decoding seeds (one seed for greedy decoding). The spread
over training seeds is what the table reports; the paired differences pair the runs of two strategies that share a
training seed (same data order, same initial student, same teacher), with Student-t intervals from
:func:`arkd.evaluation.stats.paired_difference`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from arkd.evaluation.results import HIGHER_IS_BETTER, METRIC_TITLES, summary_cell, validate_report
from arkd.evaluation.stats import (
    friedman,
    holm_adjust,
    holm_levels,
    mean_std,
    paired_difference,
    paired_t_p_value,
    ranks_within_blocks,
)

__all__ = [
    "CONTROLS",
    "MODELS",
    "control_role",
    "omnibus_tests",
    "per_seed_ranks",
    "compare",
    "comparison_markdown",
    "find_run_dirs",
    "load_run_records",
    "paired_differences",
    "plot_alpha_runs",
    "strategy_label",
    "strategy_name",
    "summary_table",
]

# The three models a training run's report.json scores; strategies are compared on the student after distillation.
MODELS = ("student_after", "student_before", "teacher")
# Report order of the metrics (the protocol's, then BERTScore's precision and recall).
_METRIC_ORDER = (
    "rougeL",
    "bertscore_f1",
    "exact_match",
    "bertscore_precision",
    "bertscore_recall",
    "fkl",
    "rkl",
    "head_recall",
    "tail_recall",
    "distinct_1",
    "distinct_2",
    "self_bleu",
)


# The two controls of a strategy matrix (docs/results.md), by the label their runs are given, and what each measures.
CONTROLS = {
    "learned_frozen": "A/A noise floor: the learned policy frozen at its initial output (policy.lr=0)",
    "constant_at_learned_mean": "adapting control: does adapting matter? a constant alpha at the learned runs' mean",
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


# --------------------------------------------------------------------------------------------------------------------
# Reading run directories


def find_run_dirs(roots: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """The run directories below ``roots``: complete ones (with ``report.json``) and incomplete ones.

    A run directory is one holding ``config.yaml`` (written by ``arkd-train`` at the start of a run), or an arkd-eval
    run directory (``results.json``) outside any training run. Directories inside a run (checkpoints, ``best/``,
    ``final/``, an arkd-eval run of its student) are not searched for further runs.

    Returns:
        ``(complete, incomplete)``, each sorted; incomplete runs have a ``config.yaml`` but no ``report.json`` yet
        (still running, crashed, or run with ``report.enabled=false``).

    Raises:
        FileNotFoundError: a root does not exist.
    """
    complete: list[Path] = []
    incomplete: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such directory; expected a run directory or a folder of runs.")
        stack = [root]
        while stack:
            folder = stack.pop()
            if (folder / "config.yaml").is_file():
                (complete if (folder / "report.json").is_file() else incomplete).append(folder)
                continue
            if (folder / "results.json").is_file():  # an arkd-eval run of its own (no training run around it)
                complete.append(folder)
                continue
            stack.extend(
                sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True)
            )
    return sorted(set(complete)), sorted(set(incomplete))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {type(data).__name__}; expected a JSON object.")
    return data


def _hydra_choices(run_dir: Path) -> dict[str, Any]:
    """Hydra's config-group choices of a run (``.hydra/hydra.yaml`` runtime.choices), or {} when absent."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())}).") from err
    choices = data.get("hydra", {}).get("runtime", {}).get("choices", {})
    return dict(choices) if isinstance(choices, dict) else {}


def _hydra_overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides (``.hydra/overrides.yaml``), or [] when absent."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())}).") from err
    return [str(o) for o in data] if isinstance(data, list) else []


def strategy_name(
    preset: str | None,
    overrides: Sequence[str] = (),
    *,
    loss: str | None = None,
    takes_alpha: bool = True,
    label: str | None = None,
) -> str:
    """The name of a run's alpha strategy in arkd-compare's tables, from what the run recorded.

    ``label`` (``arkd-train ... label=NAME``) when set; ``loss=<loss>`` for a loss that does not take alpha (no
    strategy is built with it); otherwise the ``policy`` preset (Hydra's choice, e.g. ``fkl``, ``learned``) followed
    by the run's own ``policy.*`` overrides in brackets (``constant[alpha=0.25]``), so that two variants of one preset
    never share a name.

    Args:
        preset: the ``policy`` group choice.
        overrides: the run's command-line overrides (only ``policy.KEY=VALUE`` ones enter the name).
        loss: the ``loss`` group choice (or the loss class), named when the loss ignores alpha.
        takes_alpha: whether the run's loss takes alpha (its ``takes_alpha`` declaration).
        label: the run's ``label``.
    """
    if label:
        return str(label)
    if not takes_alpha:
        return f"loss={loss}"
    own = [o.split(".", 1)[1] for o in overrides if o.startswith("policy.") and "=" in o]
    name = str(preset or "policy")
    return f"{name}[{','.join(own)}]" if own else name


def strategy_label(config: dict[str, Any], choices: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> str:
    """The name of a run's alpha strategy for a run without a recorded ``strategy`` block (runs of arkd before the
    block existed): :func:`strategy_name` from the resolved config, Hydra's group choices and the run's overrides.

    Without Hydra's record the preset is named by the policy's class and its options (``ConstantAlpha(alpha=1.0)``).
    Whether the loss takes alpha is read from the loss class's own declaration (:func:`arkd.losses.loss_capabilities`).

    Raises:
        ValueError: the config has no ``policy`` node with a ``_target_``.
    """
    choices = choices or {}
    loss = config.get("loss") or {}
    loss_target = str(loss.get("_target_", "")) if isinstance(loss, dict) else ""
    takes_alpha = True
    if loss_target and not config.get("label"):
        takes_alpha = _loss_takes_alpha(loss_target)
    if not takes_alpha:
        return strategy_name(None, loss=choices.get("loss") or loss_target.rsplit(".", 1)[-1], takes_alpha=False)
    policy = config.get("policy")
    if not config.get("label") and (not isinstance(policy, dict) or "_target_" not in policy):
        raise ValueError("the run's config has no 'policy' node with a '_target_'; expected an arkd-train config.")
    preset = choices.get("policy")
    if not preset and isinstance(policy, dict):
        options = ", ".join(f"{k}={v}" for k, v in policy.items() if k != "_target_")
        preset = f"{str(policy['_target_']).rsplit('.', 1)[-1]}({options})"
    return strategy_name(preset, overrides, label=config.get("label"))


def _loss_takes_alpha(target: str) -> bool:
    from hydra.utils import get_class

    from arkd.losses import loss_capabilities

    try:
        return loss_capabilities(get_class(target)).takes_alpha
    except Exception:  # not importable, or not a declared arkd loss: named as a loss, not as a strategy
        return False


def _dataset_name(config: dict[str, Any], choices: dict[str, Any]) -> str:
    if choices.get("data"):
        return str(choices["data"])
    target = str(config.get("data", {}).get("splits", {}).get("_target_", "test"))
    name = target.rsplit(".", 1)[-1]
    return name.removesuffix("_splits") or "test"


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not a finite number; expected a score on the 0-100 scale.")
    return float(value)


def _results_json_records(path: Path, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of one arkd-eval ``results.json``: its student's score per dataset and metric."""
    from arkd.evaluation.reports import validate_results

    results = _read_json(path)
    validate_results(results, str(path))
    base = {"strategy": str(results["label"]), "seed": 0, **base}  # an arkd-eval run alone: its label, one seed
    return [
        {
            **base,
            "model": "student_after",
            "dataset": name,
            "metric": metric,
            "value": _number(entry[metric]["mean"], f"{path} datasets.{name}.{metric}.mean"),
            "source": str(path),
        }
        for name, entry in results["datasets"].items()
        for metric in _METRIC_ORDER
        if metric in entry
    ]


def _run_records(run_dir: Path) -> list[dict[str, Any]]:
    if not (run_dir / "config.yaml").is_file():  # an arkd-eval run of its own
        return _results_json_records(run_dir / "results.json", {"run": str(run_dir)})
    report_path = run_dir / "report.json"
    report = _read_json(report_path)
    validate_report(report, str(report_path))
    config = report.get("config")
    if not isinstance(config, dict):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
    choices = _hydra_choices(run_dir)
    if "seed" not in config:
        raise ValueError(f"{run_dir / 'config.yaml'}: missing key 'seed'; expected an arkd-train config.")
    seed = int(config["seed"])
    recorded = report.get("strategy")
    if isinstance(recorded, dict) and recorded.get("name"):
        strategy = str(recorded["name"])  # what the run recorded (arkd.recipes.distill)
    else:
        strategy = strategy_label(config, choices, _hydra_overrides(run_dir))
    base = {"run": str(run_dir), "strategy": strategy, "seed": seed}
    records: list[dict[str, Any]] = []
    results = report["results"]
    dataset = _dataset_name(config, choices)
    for model in MODELS:
        for metric, summary in (results.get(model) or {}).items():
            if isinstance(summary, dict) and "mean" in summary:
                where = f"{report_path} results.{model}.{metric}.mean"
                records.append(
                    {
                        **base,
                        "model": model,
                        "dataset": dataset,
                        "metric": metric,
                        "value": _number(summary["mean"], where),
                    }
                )
    # arkd-eval results of this run's student (any results.json below the run directory).
    for path in sorted(run_dir.rglob("results.json")):
        if "checkpoints" not in path.relative_to(run_dir).parts:
            records += _results_json_records(path, base)
    return records


def load_run_records(roots: Iterable[str | os.PathLike]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Tidy records of every complete run below ``roots`` (see the module docstring), and the incomplete runs.

    Raises:
        FileNotFoundError: a root does not exist.
        ValueError: no complete run; a malformed ``report.json`` / ``results.json`` (names the file and key); or two
            runs with the same strategy, seed, model, dataset and metric (names both directories).
    """
    roots = list(roots)
    complete, incomplete = find_run_dirs(roots)
    if not complete:
        where = ", ".join(str(r) for r in roots)
        raise ValueError(f"no run directory with a report.json below {where}; expected arkd-train run directories.")
    records: list[dict[str, Any]] = []
    seen: dict[tuple, str] = {}
    for run_dir in complete:
        for record in _run_records(run_dir):
            key = (record["strategy"], record["seed"], record["model"], record["dataset"], record["metric"])
            if record["model"] == "student_after" and key in seen and seen[key] != record["run"]:
                raise ValueError(
                    f"two runs have strategy {key[0]!r} and seed {key[1]} ({seen[key]} and {record['run']}); "
                    "expected one run per strategy and seed: aggregate them separately."
                )
            seen[key] = record["run"]
            records.append(record)
    return records, incomplete


# --------------------------------------------------------------------------------------------------------------------
# Table and paired differences


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
    # Holm over the comparisons of each dataset: adjusted p values and intervals at each comparison's Holm level.
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
    for d in out:
        del d["_pair"]
    return out


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


# --------------------------------------------------------------------------------------------------------------------
# Figures


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


# --------------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return summary_cell(None)
    return summary_cell({"mean": cell["mean"], "std": cell["std"] if cell["n"] > 1 else None})


def comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison as markdown: one table per metric (mean ± std over seeds), reference models, paired differences.

    Args:
        result: the dict :func:`compare` returns.
    """
    reference = result["reference"]
    level = round(100 * result["confidence"])
    lines = [
        "# Comparison of alpha strategies",
        "",
        f"{len(result['runs'])} runs; strategies {', '.join(result['strategies'])}; seeds "
        f"{', '.join(str(s) for s in result['seeds'])}. Scores of the student after distillation on the test split, "
        "0-100; mean ± sample std over training seeds.",
    ]
    if result["incomplete"]:
        lines += [
            "",
            f"Not included ({len(result['incomplete'])} runs without report.json): "
            + ", ".join(f"`{p}`" for p in result["incomplete"])
            + ".",
        ]
    controls = result.get("controls") or {}
    if controls:
        lines += ["", "Controls:"] + [f"- `{name}`: {role}." for name, role in controls.items()]
    by_dataset = result.get("omnibus_by_dataset") or {}
    if by_dataset:
        lines += [
            "",
            "## Omnibus tests (before any pairwise difference)",
            "",
            "Friedman's test over strategies x seeds (the seeds every strategy ran): is there any strategy effect at "
            "all? Pairwise differences below are worth reading only where this rejects.",
            "",
            "| metric | dataset | strategies | seeds | chi^2 | p |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for metric, tests in by_dataset.items():
            for dataset, t in tests.items():
                lines.append(
                    f"| {METRIC_TITLES.get(metric, metric)} | {dataset} | {t['n_strategies']} | {t['n_seeds']} | "
                    f"{_fmt(t['statistic'])} | {_fmt(t['p_value'], 4)} |"
                )
    for metric in result["metrics"]:
        table = result["tables"][metric]
        datasets = result["datasets"][metric]
        title = METRIC_TITLES.get(metric, metric)
        lines += [
            "",
            f"## {title}",
            "",
            "| strategy | " + " | ".join(datasets) + " | seeds |",
            "|---|" + "---:|" * len(datasets) + "---:|",
        ]
        best = {d: max((row[d]["mean"] for row in table.values() if d in row), default=None) for d in datasets}
        for strategy, row in table.items():
            cells = []
            for d in datasets:
                text = _cell(row.get(d))
                cells.append(f"**{text}**" if d in row and row[d]["mean"] == best[d] else text)
            n = max((c["n"] for c in row.values()), default=0)
            lines.append(f"| {_named(strategy, controls)} | " + " | ".join(cells) + f" | {n} |")
        for model, name in (("student_before", "student before distillation"), ("teacher", "teacher")):
            ref_table = result["reference_models"].get(metric, {}).get(model)
            if ref_table:
                cells = [_cell(ref_table.get(d)) for d in datasets]
                n = max((c["n"] for c in ref_table.values()), default=0)
                lines.append(f"| *{name}* | " + " | ".join(cells) + f" | {n} |")
        for dataset, test in (result.get("omnibus_by_dataset") or {}).get(metric, {}).items():
            if test["p_value"] is not None:
                lines += [
                    "",
                    f"Omnibus ({dataset}): Friedman chi^2 = {test['statistic']:.2f}, p = {test['p_value']:.4f} over "
                    f"{test['n_strategies']} strategies x {test['n_seeds']} seeds.",
                ]
        for dataset, info in (result.get("ranks") or {}).get(metric, {}).items():
            direction = info["higher_is_better"]
            sense = "1 = highest" if direction is None else ("1 = best (highest)" if direction else "1 = best (lowest)")
            lines += [
                "",
                f"Per-seed ranks on {dataset} ({sense}; seeds {', '.join(str(s) for s in info['seeds'])}):",
                "",
                "| strategy | ranks | mean rank |",
                "|---|---|---:|",
            ]
            for strategy in sorted(info["mean_rank"], key=info["mean_rank"].__getitem__):
                ranks_text = ", ".join(f"{r:g}" for r in info["ranks"][strategy])
                lines.append(f"| {_named(strategy, controls)} | {ranks_text} | {info['mean_rank'][strategy]:.2f} |")
        diffs = result["differences"][metric]
        if diffs:
            lines += [
                "",
                f"Paired difference {reference} − strategy over the same seeds ({level}% Student-t interval, "
                f"uncorrected; * : it excludes 0). Holm: p adjusted over the {len(diffs)} comparisons and the interval "
                "at each comparison's Holm level († : significant after the correction):",
                "",
                "| strategy | dataset | n | mean diff | std | interval | p | Holm p | Holm interval |",
                "|---|---|---:|---:|---:|---|---:|---:|---|",
            ]
            for d in diffs:
                mark = " *" if d["significant"] else ""
                mark += " †" if d.get("holm_significant") else ""
                interval = f"[{_fmt(d['low'])}, {_fmt(d['high'])}]" if d["n"] > 1 else "– (one seed)"
                holm = (
                    f"[{_fmt(d.get('holm_low'))}, {_fmt(d.get('holm_high'))}]"
                    if d["n"] > 1 and d.get("holm_low") is not None
                    else "–"
                )
                lines.append(
                    f"| {_named(d['strategy'], controls)} | {d['dataset']} | {d['n']} | {d['mean']:+.2f}{mark} | "
                    f"{_fmt(d['std'])} | {interval} | {_fmt(d.get('p_value'), 4)} | {_fmt(d.get('holm_p'), 4)} | "
                    f"{holm} |"
                )
        elif reference not in table:
            lines += ["", f"No paired differences: no `{reference}` run."]
    if result.get("figures"):
        lines += [""] + [f"![{name}]({Path(p).name})" for name, p in result["figures"].items()]
    return "\n".join(lines) + "\n"


def _named(strategy: str, controls: dict[str, str]) -> str:
    """A strategy's table name; a control carries its role (the A/A noise floor, the adapting control)."""
    role = controls.get(strategy)
    if role is None:
        return strategy
    return f"{strategy} (*{role.split(':')[0]}*)"


def _mean_over_datasets(cell_row: dict[str, dict[str, Any]]) -> float:
    return sum(c["mean"] for c in cell_row.values()) / len(cell_row)


def _json_safe(value: Any) -> Any:
    """NaN (the interval of a single seed) as null, so that comparison.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def compare(
    roots: Iterable[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    reference: str = "learned",
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
    order: Sequence[str] = (),
) -> dict[str, Any]:
    """Aggregate the runs below ``roots``; with ``out``, write the comparison files there.

    Writes ``comparison.md``, ``comparison.json`` (records, tables, differences), ``heatmap.png`` (strategy x dataset
    of the first metric, mean over seeds; rows sorted by their average) and ``alpha_trajectory.png`` (alpha over
    training of every ``reference`` run, one line per seed); ``alpha_strategies.png`` shows one run per strategy
    (the lowest seed) for the strategies that log alpha.

    Args:
        roots: run directories or folders of them (a multirun's sweep directory).
        out: the output folder (None: compute only).
        reference: the strategy the paired differences are taken against.
        metrics: which metrics (default: those present, Rouge-L and BERTScore F1 first).
        confidence: the level of the paired intervals.
        order: strategies to list first, in this order (the others follow in the records' order).

    Returns:
        ``{"reference", "confidence", "metrics", "strategies", "seeds", "datasets", "tables", "reference_models",
        "differences", "omnibus", "omnibus_by_dataset", "ranks", "controls", "records", "runs", "incomplete",
        "figures"}``. Every paired difference also has ``p_value`` (paired t), ``holm_p``, ``holm_level``,
        ``holm_low`` / ``holm_high`` and ``holm_significant`` (Holm over the comparisons of its metric and dataset).
        ``heatmap_metrics.png`` (strategy x metric) and ``head_tail_recall.png`` are drawn when the metrics exist.
    """
    records, incomplete = load_run_records(roots)
    present = {r["metric"] for r in records if r["model"] == "student_after"}
    if metrics is None:
        metrics = [m for m in _METRIC_ORDER if m in present] + sorted(present - set(_METRIC_ORDER))
    else:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise ValueError(f"no run has metric(s) {', '.join(missing)}; the runs have: {', '.join(sorted(present))}.")
    strategies = _ordered((r["strategy"] for r in records), order)
    rank = {s: i for i, s in enumerate(strategies)}
    tables, datasets, ref_models, differences = {}, {}, {}, {}
    for metric in metrics:
        table = summary_table(records, metric)
        tables[metric] = {s: table[s] for s in sorted(table, key=rank.__getitem__)}
        datasets[metric] = _ordered(d for row in table.values() for d in row)
        differences[metric] = sorted(
            paired_differences(records, metric, reference=reference, confidence=confidence),
            key=lambda d: (rank[d["strategy"]], d["dataset"]),
        )
    omnibus_by_dataset = {metric: omnibus_tests(records, metric) for metric in metrics}
    ranks = {metric: per_seed_ranks(records, metric) for metric in metrics}
    # Reference models do not depend on the strategy: average each seed's value over the strategies' runs.
    for metric in metrics:
        ref_models[metric] = {}
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
            ref_models[metric][model] = cells
    result: dict[str, Any] = {
        "reference": reference,
        "confidence": confidence,
        "metrics": list(metrics),
        "strategies": strategies,
        "seeds": sorted({r["seed"] for r in records}),
        "datasets": datasets,
        "tables": tables,
        "reference_models": ref_models,
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
        "ranks": ranks,
        "controls": {s: control_role(s) for s in strategies if control_role(s)},
        "records": records,
        "runs": sorted({r["run"] for r in records}),
        "incomplete": [str(p) for p in incomplete],
        "figures": {},
    }
    if out is None:
        return result
    from arkd.evaluation.plots import plot_heatmap

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if metrics:
        metric = metrics[0]
        table = tables[metric]
        rows = sorted(table, key=lambda s: -_mean_over_datasets(table[s]))
        cols = datasets[metric]
        values = [[table[s][d]["mean"] if d in table[s] else None for d in cols] for s in rows]
        title = f"{METRIC_TITLES.get(metric, metric)} (mean over {len(result['seeds'])} seeds)"
        result["figures"]["heatmap"] = str(plot_heatmap(rows, cols, values, out / "heatmap.png", title=title))
    from arkd.evaluation.plots import plot_head_tail, plot_metric_heatmap

    main_dataset = {m: datasets[m][0] for m in metrics if datasets[m]}
    shown = [m for m in metrics if m in main_dataset]
    if len(shown) > 1:
        rows = [s for s in strategies if all(main_dataset[m] in tables[m].get(s, {}) for m in shown[:1])]
        values = [
            [tables[m][s][main_dataset[m]]["mean"] if main_dataset[m] in tables[m].get(s, {}) else None for m in shown]
            for s in rows
        ]
        path = plot_metric_heatmap(
            rows,
            [METRIC_TITLES.get(m, m) for m in shown],
            values,
            out / "heatmap_metrics.png",
            higher_is_better=[HIGHER_IS_BETTER.get(m) for m in shown],
            title=f"strategy x metric on {main_dataset[shown[0]]} (mean over seeds)",
        )
        result["figures"]["heatmap_metrics"] = str(path)
    if "head_recall" in main_dataset and "tail_recall" in main_dataset:
        both = [
            s
            for s in strategies
            if main_dataset["head_recall"] in tables["head_recall"].get(s, {})
            and main_dataset["tail_recall"] in tables["tail_recall"].get(s, {})
        ]
        if both:
            cells = {m: [tables[m][s][main_dataset[m]] for s in both] for m in ("head_recall", "tail_recall")}
            path = plot_head_tail(
                both,
                [(c["mean"], c["std"]) for c in cells["head_recall"]],
                [(c["mean"], c["std"]) for c in cells["tail_recall"]],
                out / "head_tail_recall.png",
            )
            result["figures"]["head_tail_recall"] = str(path)
    by_strategy: dict[str, dict[int, str]] = {}
    for r in records:
        by_strategy.setdefault(r["strategy"], {})[r["seed"]] = r["run"]
    if reference in by_strategy:
        runs = [(f"seed {s}", by_strategy[reference][s]) for s in sorted(by_strategy[reference])]
        try:
            path = plot_alpha_runs(runs, out / "alpha_trajectory.png", title=f"{reference}: alpha over training")
            result["figures"]["alpha_trajectory"] = str(path)
        except (FileNotFoundError, ValueError) as err:
            print(f"compare: no alpha trajectory for {reference} ({err})", file=sys.stderr)
    first_runs = [(s, by_strategy[s][min(by_strategy[s])]) for s in strategies]
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
    (out / "comparison.md").write_text(comparison_markdown(result), encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps(_json_safe(result), indent=2) + "\n", encoding="utf-8")
    return result
