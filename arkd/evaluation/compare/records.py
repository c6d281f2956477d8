"""Reading run directories into tidy records, one per (run, model, dataset, metric) (see
:mod:`arkd.evaluation.compare`): which directories are runs (:func:`find_run_dirs`), and what a training run's
``report.json`` and the ``results.json`` files of arkd-eval below it score (:func:`load_run_records`)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from arkd.evaluation.results import validate_report
from arkd.naming import strategy_label

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
