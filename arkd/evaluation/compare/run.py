"""arkd-compare's one call: :func:`compare` reads the runs (:mod:`.records`), aggregates them (:mod:`.aggregate`),
and with an output folder draws the figures (:mod:`.figures`) and writes ``comparison.md`` and ``comparison.json``
(:mod:`.render`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .aggregate import aggregate, select_metrics
from .figures import draw_figures
from .records import load_run_records
from .render import comparison_json, comparison_markdown


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
    metrics = select_metrics(records, metrics)
    result = aggregate(records, incomplete, metrics, reference=reference, confidence=confidence, order=order)
    if out is None:
        return result
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    draw_figures(result, out)
    (out / "comparison.md").write_text(comparison_markdown(result), encoding="utf-8")
    (out / "comparison.json").write_text(comparison_json(result), encoding="utf-8")
    return result
