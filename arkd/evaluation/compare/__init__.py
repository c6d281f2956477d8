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

The package: :mod:`.records` (run directories -> tidy records), :mod:`.aggregate` (tables, omnibus tests, paired
differences, reference models; the statistics are :mod:`arkd.evaluation.stats`), :mod:`.figures` (the plots),
:mod:`.render` (markdown and JSON), :mod:`.run` (:func:`compare`, the orchestration). The strategy names come from
:mod:`arkd.naming` (re-exported here).
"""

from __future__ import annotations

from arkd.naming import strategy_label, strategy_name

from .aggregate import CONTROLS, control_role, omnibus_tests, paired_differences, per_seed_ranks, summary_table
from .figures import plot_alpha_runs
from .records import MODELS, find_run_dirs, load_run_records
from .render import comparison_markdown
from .run import compare

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
