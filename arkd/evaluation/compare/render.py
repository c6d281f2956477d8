"""The comparison as markdown (:func:`comparison_markdown`) and as strict JSON (:func:`comparison_json`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from arkd.evaluation.results import HIGHER_IS_BETTER, METRIC_TITLES, summary_cell


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
        result: the dict :func:`arkd.evaluation.compare.compare` returns.
    """
    controls = result.get("controls") or {}
    lines = _header_lines(result, controls) + _omnibus_lines(result)
    for metric in result["metrics"]:
        lines += _table_lines(result, metric, controls)
        lines += _omnibus_sentences(result, metric)
        lines += _rank_lines(result, metric, controls)
        lines += _difference_lines(result, metric, controls)
    if result.get("figures"):
        lines += [""] + [f"![{name}]({Path(p).name})" for name, p in result["figures"].items()]
    return "\n".join(lines) + "\n"


def _header_lines(result: dict[str, Any], controls: dict[str, str]) -> list[str]:
    """The title, what was compared, the runs left out and the controls."""
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
    if controls:
        lines += ["", "Controls:"] + [f"- `{name}`: {role}." for name, role in controls.items()]
    return lines


def _omnibus_lines(result: dict[str, Any]) -> list[str]:
    """The omnibus tests of every metric and dataset, before any pairwise difference."""
    by_dataset = result.get("omnibus_by_dataset") or {}
    if not by_dataset:
        return []
    lines = [
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
    return lines


def _table_lines(result: dict[str, Any], metric: str, controls: dict[str, str]) -> list[str]:
    """A metric's table: strategy x dataset (the best mean in bold, where a metric has a better direction), then the
    reference models."""
    table = result["tables"][metric]
    datasets = result["datasets"][metric]
    title = METRIC_TITLES.get(metric, metric)
    lines = [
        "",
        f"## {title}",
        "",
        "| strategy | " + " | ".join(datasets) + " | seeds |",
        "|---|" + "---:|" * len(datasets) + "---:|",
    ]
    # The best mean in bold: the highest, the lowest where lower is better (fkl, rkl), none for a trade-off metric.
    direction = HIGHER_IS_BETTER.get(metric)
    pick = max if direction else min
    best = {
        d: None if direction is None else pick((row[d]["mean"] for row in table.values() if d in row), default=None)
        for d in datasets
    }
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
    return lines


def _omnibus_sentences(result: dict[str, Any], metric: str) -> list[str]:
    lines = []
    for dataset, test in (result.get("omnibus_by_dataset") or {}).get(metric, {}).items():
        if test["p_value"] is not None:
            lines += [
                "",
                f"Omnibus ({dataset}): Friedman chi^2 = {test['statistic']:.2f}, p = {test['p_value']:.4f} over "
                f"{test['n_strategies']} strategies x {test['n_seeds']} seeds.",
            ]
    return lines


def _rank_lines(result: dict[str, Any], metric: str, controls: dict[str, str]) -> list[str]:
    lines = []
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
    return lines


def _difference_lines(result: dict[str, Any], metric: str, controls: dict[str, str]) -> list[str]:
    """The paired differences of a metric against the reference, uncorrected and Holm-corrected."""
    reference = result["reference"]
    level = round(100 * result["confidence"])
    diffs = result["differences"][metric]
    if not diffs:
        if reference in result["tables"][metric]:
            return []
        return ["", f"No paired differences: no `{reference}` run."]
    lines = [
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
    return lines


def _named(strategy: str, controls: dict[str, str]) -> str:
    """A strategy's table name; a control carries its role (the A/A noise floor, the adapting control)."""
    role = controls.get(strategy)
    if role is None:
        return strategy
    return f"{strategy} (*{role.split(':')[0]}*)"


def comparison_json(result: dict[str, Any]) -> str:
    """The text of ``comparison.json``: the result as strict JSON (NaN as null), indented."""
    return json.dumps(_json_safe(result), indent=2) + "\n"


def _json_safe(value: Any) -> Any:
    """NaN (the interval of a single seed) as null, so that comparison.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
