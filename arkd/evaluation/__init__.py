"""arkd.evaluation: the MiniLLM evaluation protocol (generation, Rouge-L, exact match, BERTScore), reports, plots.

Names are imported lazily, so ``import arkd.evaluation`` stays light and Rouge-L's worker processes import only
``rouge_score``. See docs/evaluation.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "rouge_l": "metrics",
    "rouge_l_per_row": "metrics",
    "exact_match": "metrics",
    "exact_match_per_row": "metrics",
    "normalize_answer": "metrics",
    "bertscore": "metrics",
    "mean_x100": "metrics",
    "BertScoreLoadError": "metrics",
    "DecodingConfig": "generation",
    "GREEDY": "generation",
    "PROTOCOL_SEEDS": "generation",
    "BertScoreSettings": "generation",
    "generate": "generation",
    "evaluate_model": "generation",
    "clean_output": "generation",
    "legacy_cleanup": "generation",
    "summarize": "generation",
    "row_seed": "generation",
    "row_generator": "generation",
    "sample_rows": "generation",
    "shard_rows": "sharding",
    "gather_rows": "sharding",
    "generate_sharded": "sharding",
    "build_results": "reports",
    "validate_results": "reports",
    "write_run_outputs": "reports",
    "results_markdown": "reports",
    "validate_report": "results",
    "summary_cell": "results",
    "METRIC_TITLES": "results",
    "package_versions": "reports",
    "model_identity": "reports",
    "plot_alpha_trajectory": "plots",
    "plot_dynamics": "plots",
    "plot_heatmap": "plots",
    "plot_metric_heatmap": "plots",
    "plot_head_tail": "plots",
    "distinct_n": "distribution",
    "self_bleu": "distribution",
    "teacher_forced_metrics": "distribution",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'arkd.evaluation' has no attribute {name!r}")
    value = getattr(import_module(f"arkd.evaluation.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
