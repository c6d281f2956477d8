"""One results story: the schema ``report.json`` (arkd-train's end-of-run report) and ``results.json`` (arkd-eval)
share, the one cell renderer, and the one metric vocabulary.

Both files hold *score blocks*, one per (model, dataset, metric), of one shape on the 0-100 scale::

    {"mean": 23.4, "std": 0.6, "per_seed": {"10": 23.1, "20": 23.9}}   # std: sample std over seeds (None for one)

and both carry ``schema_version`` (:data:`SCHEMA_VERSION`). They differ only in what they score:

- ``results.json`` (one model, several datasets): ``label``, ``model``, ``settings``, ``datasets: {name: {"source",
  "n_rows", <metric>: block}}``, ``versions``, ``environment``, ``config`` (see :mod:`arkd.evaluation.reports`);
- ``report.json`` (three models, the run's test split): ``experiment``, ``strategy`` (the run's strategy name and
  preset, :func:`arkd.naming.strategy_name`), ``results: {teacher | student_before | student_after:
  {<metric>: block}}``, ``decoding``, ``seeds``, ``training``, ``examples``, ``config``.

Other top-level blocks are allowed and kept (the training report's ``alpha_signal`` block, for instance): readers
take the keys they know and ignore the rest, so a new block needs no schema change. :func:`validate_report` and
:func:`arkd.evaluation.reports.validate_results` check the two; arkd-compare
(:func:`arkd.evaluation.compare.load_run_records`) is the one loader and aggregator of both.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
# The protocol's metrics, in report order; BERTScore's precision and recall ride along when computed.
METRICS = ("rougeL", "exact_match", "bertscore_f1")
# The distribution-level metrics (arkd.evaluation.distribution): one pooled value per model and dataset, no per-seed
# values. fkl / rkl are nats per token (>= 0), the recalls ratios to the teacher's mass (>= 0, 1: the teacher's own),
# distinct-n and self-BLEU 0-100.
DISTRIBUTION_METRICS = ("fkl", "rkl", "head_recall", "tail_recall", "distinct_1", "distinct_2", "self_bleu")
UNBOUNDED_METRICS = ("fkl", "rkl", "head_recall", "tail_recall")
ALL_METRICS = (*METRICS, "bertscore_precision", "bertscore_recall", *DISTRIBUTION_METRICS)
METRIC_TITLES = {
    "rougeL": "Rouge-L",
    "exact_match": "Exact match",
    "bertscore_f1": "BERTScore F1",
    "bertscore_precision": "BERTScore P",
    "bertscore_recall": "BERTScore R",
    "fkl": "FKL (nats/token)",
    "rkl": "RKL (nats/token)",
    "head_recall": "Head recall",
    "tail_recall": "Tail recall",
    "distinct_1": "Distinct-1",
    "distinct_2": "Distinct-2",
    "self_bleu": "Self-BLEU",
}
# Which direction is better, for the metrics where one is (None: neither; a trade-off metric).
HIGHER_IS_BETTER = {
    "rougeL": True,
    "exact_match": True,
    "bertscore_f1": True,
    "bertscore_precision": True,
    "bertscore_recall": True,
    "fkl": False,
    "rkl": False,
}
# The models a training report scores.
REPORT_MODELS = ("teacher", "student_before", "student_after")

__all__ = [
    "ALL_METRICS",
    "DISTRIBUTION_METRICS",
    "HIGHER_IS_BETTER",
    "METRICS",
    "METRIC_TITLES",
    "REPORT_MODELS",
    "SCHEMA_VERSION",
    "UNBOUNDED_METRICS",
    "check_block",
    "summary_cell",
    "validate_report",
]


def summary_cell(block: dict[str, Any] | None, digits: int = 2) -> str:
    """A score block (or a table cell with ``mean`` / ``std``) as ``mean ± std`` text; ``–`` when missing."""
    if block is None:
        return "–"
    if block.get("std") is None:
        return f"{block['mean']:.{digits}f}"
    return f"{block['mean']:.{digits}f} ± {block['std']:.{digits}f}"


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing key '{key}'.")
    value = obj[key]
    if (
        not isinstance(value, kind)
        or isinstance(value, bool)
        and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: key '{key}' is {type(value).__name__}; expected {names}.")
    return value


def check_block(block: Any, where: str, metric: str | None = None) -> None:
    """Check one score block: ``mean`` in [0, 100], ``std`` None or >= 0, a non-empty ``per_seed``.

    A distribution-level ``metric`` (:data:`DISTRIBUTION_METRICS`) pools the seeds: its ``per_seed`` may be empty,
    and fkl / rkl / the recalls need only be finite and >= 0. ``metric`` defaults to the last part of ``where``.
    """
    metric = metric if metric is not None else where.rsplit(".", 1)[-1]
    pooled = metric in DISTRIBUTION_METRICS
    mean = _require(block, "mean", (int, float), where)
    std = _require(block, "std", (int, float, type(None)), where)
    per_seed = _require(block, "per_seed", dict, where)
    if not per_seed and not pooled:
        raise ValueError(f"{where}: 'per_seed' is empty; expected one value per seed.")
    upper = float("inf") if metric in UNBOUNDED_METRICS else 100
    if not 0 <= mean <= upper or mean != mean or (std is not None and std < 0):
        bound = "0 <= mean" if upper == float("inf") else "0 <= mean <= 100"
        raise ValueError(f"{where}: mean {mean} / std {std} out of range; expected {bound} and std >= 0.")


def validate_report(report: Any, where: str = "report.json") -> None:
    """Check a training ``report.json``: its schema version (when recorded) and every score block of ``results``.

    Raises:
        ValueError: naming the first bad key.
    """
    if not isinstance(report, dict):
        raise ValueError(f"{where}: a {type(report).__name__}; expected a JSON object.")
    version = report.get("schema_version", SCHEMA_VERSION)  # reports of arkd before the key existed are version 1
    if version != SCHEMA_VERSION:
        raise ValueError(f"{where}: schema_version {version} is not supported; expected {SCHEMA_VERSION}.")
    results = _require(report, "results", dict, where)
    if "student_after" not in results:
        raise ValueError(f"{where}: missing key 'results.student_after'; expected an arkd-train report.")
    for model, blocks in results.items():
        if not isinstance(blocks, dict):
            raise ValueError(f"{where}: results.{model} is {type(blocks).__name__}; expected metric blocks.")
        for metric, block in blocks.items():
            check_block(block, f"{where} results.{model}.{metric}", metric)
