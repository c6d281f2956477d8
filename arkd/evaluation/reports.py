"""What an evaluation run writes (``generations.jsonl``, ``results.json``, ``results.md``).

The schema it shares with the training report, the cell renderer and the metric names are in
:mod:`arkd.evaluation.results`; arkd-compare reads and aggregates both kinds of file.

``results.json`` (``SCHEMA_VERSION`` 1) records everything a number depends on::

    {
      "schema_version": 1,
      "created_utc": "2026-11-23T12:00:00+00:00",
      "label": "arkd-gpt2-120m",                    # the run's name in aggregate tables
      "model": {"source", "resolved_path", "class", "n_parameters", "dtype", "device", "commit_hash",
                "weights_sha256", "tokenizer": {"source", "class", "vocab_size", "eos_token"}},
      "settings": {"seeds", "batch_size", "decoding": {...}, "bertscore": {"enabled", "model_type", "num_layers",
                   "idf", "rescale_with_baseline", "lang", "bert_score_version", "hash"},
                   "rouge": {...}, "exact_match": {...}},
      "datasets": {"dolly": {"source", "n_rows", "max_rows",
                             "rougeL": {"mean", "std", "per_seed"}, "exact_match": {...},
                             "bertscore_f1": {...}, "bertscore_precision": {...}, "bertscore_recall": {...}}},
      "versions": {"python", "arkd", "torch", "transformers", "rouge-score", "bert-score", ...},
      "environment": {"platform", "device_name", "git_commit", "git_dirty"},
      "config": {...}                               # the resolved arkd-eval config, when run from the CLI
    }

Metrics are on the 0-100 scale; ``std`` is the sample standard deviation over seeds (None for a single seed).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from arkd.evaluation.results import (
    DISTRIBUTION_METRICS,
    METRIC_TITLES,
    METRICS,
    SCHEMA_VERSION,
    _require,
    check_block,
    summary_cell,
)

_PACKAGES = (
    "arkd",
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "rouge-score",
    "nltk",
    "bert-score",
    "numpy",
    "datasets",
    "hydra-core",
)
ROUGE_SETTINGS = {
    "implementation": "rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)",
    "score": "fmeasure of score(target=reference, prediction=generation), max over references",
    "aggregate": "mean over rows x100, rounded to 4 decimals",
}
EXACT_MATCH_SETTINGS = {
    "normalisation": "lowercase, remove string.punctuation, squash whitespace (articles kept)",
    "aggregate": "max over references, mean over rows x100, rounded to 4 decimals",
}


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of every package a reported number depends on (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def environment_info(device: str | None = None) -> dict[str, Any]:
    """Platform, accelerator and arkd's git commit (when run from a checkout)."""
    import torch

    commit, dirty = _git_state()
    device_name = None
    if device and device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    return {
        "platform": platform.platform(),
        "executable": sys.executable,
        "device": device,
        "device_name": device_name,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model, source: str, *, tokenizer=None, tokenizer_source: str | None = None, hash_weights=True):
    """Who the evaluated model is: where it came from, its class and size, and a hash of its weight files.

    Args:
        model: the loaded model.
        source: the path or Hub name it was loaded from.
        tokenizer: its tokenizer (recorded when given).
        tokenizer_source: where the tokenizer came from (default: ``source``).
        hash_weights: SHA-256 of every ``*.safetensors`` / ``*.bin`` file when ``source`` is a local directory.

    Returns:
        A JSON-ready dict (see the module docstring).
    """
    path = Path(source)
    local = path.exists()
    weights: dict[str, str] | None = None
    if local and hash_weights:
        files = [path] if path.is_file() else sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
        weights = {f.name: _sha256(f) for f in files}
    config = getattr(model, "config", None)
    first = next(iter(model.parameters()), None)
    identity: dict[str, Any] = {
        "source": str(source),
        "resolved_path": str(path.resolve()) if local else None,
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "commit_hash": getattr(config, "_commit_hash", None),
        "weights_sha256": weights,
    }
    if tokenizer is not None:
        identity["tokenizer"] = {
            "source": str(tokenizer_source or source),
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
        }
    return identity


def build_results(
    datasets: dict[str, dict[str, Any]],
    *,
    label: str,
    model: dict[str, Any],
    settings: dict[str, Any],
    environment: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble ``results.json`` from per-dataset reports (``evaluate_model`` output plus ``source``/``max_rows``).

    Args:
        datasets: dataset name -> ``{"source", "max_rows", **evaluate_model(...)}``; generations and per-row scores
            are dropped here (they go to ``generations.jsonl``).
        label: the run's name in aggregate tables.
        model: ``model_identity(...)``.
        settings: seeds, batch size, decoding and BERTScore settings (``{"enabled": False}`` when skipped).
        environment: ``environment_info(...)`` (computed when None).
        config: the resolved CLI config, recorded verbatim.
    """
    kept = (
        "source",
        "n_rows",
        "max_rows",
        *METRICS,
        "bertscore_precision",
        "bertscore_recall",
        "rows_per_process",
        *DISTRIBUTION_METRICS,
    )
    results = {
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label": label,
        "model": model,
        "settings": {**settings, "rouge": ROUGE_SETTINGS, "exact_match": EXACT_MATCH_SETTINGS},
        "datasets": {name: {k: report[k] for k in kept if k in report} for name, report in datasets.items()},
        "versions": package_versions(),
        "environment": environment if environment is not None else environment_info(),
    }
    if config is not None:
        results["config"] = config
    validate_results(results)
    return results


def validate_results(results: Any, where: str = "results.json") -> None:
    """Check a ``results.json`` object against schema version 1; raise ValueError naming the first bad key."""
    version = _require(results, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        raise ValueError(f"{where}: schema_version {version} is not supported; expected {SCHEMA_VERSION}.")
    _require(results, "created_utc", str, where)
    _require(results, "label", str, where)
    model = _require(results, "model", dict, where)
    _require(model, "source", str, f"{where} model")
    settings = _require(results, "settings", dict, where)
    seeds = _require(settings, "seeds", list, f"{where} settings")
    _require(settings, "decoding", dict, f"{where} settings")
    bert = _require(settings, "bertscore", dict, f"{where} settings")
    enabled = _require(bert, "enabled", bool, f"{where} settings.bertscore")
    versions = _require(results, "versions", dict, where)
    for package in ("torch", "transformers", "rouge-score", "bert-score"):
        _require(versions, package, (str, type(None)), f"{where} versions")
    datasets = _require(results, "datasets", dict, where)
    if not datasets:
        raise ValueError(f"{where}: 'datasets' is empty; expected at least one dataset.")
    for name, entry in datasets.items():
        at = f"{where} datasets.{name}"
        _require(entry, "source", str, at)
        _require(entry, "n_rows", int, at)
        for metric in METRICS if enabled else METRICS[:2]:
            check_block(_require(entry, metric, dict, at), f"{at}.{metric}")
            if sorted(entry[metric]["per_seed"]) != sorted(str(s) for s in seeds):
                raise ValueError(f"{at}.{metric}: per_seed keys differ from settings.seeds {seeds}.")
        for metric in DISTRIBUTION_METRICS:
            if metric in entry:
                check_block(_require(entry, metric, dict, at), f"{at}.{metric}", metric)


def generation_records(dataset: str, examples: Sequence[Any], report: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One ``generations.jsonl`` record per (seed, row): prompt, references, generation and the row's scores."""
    for seed, outputs in report["generations"].items():
        scores = report.get("per_row", {}).get(seed, {})
        for row, (example, generation) in enumerate(zip(examples, outputs)):
            record = {
                "dataset": dataset,
                "seed": int(seed),
                "row": row,
                "prompt": example.prompt,
                "references": list(example.references),
                "generation": generation,
            }
            for metric, values in scores.items():
                record[metric] = values[row]
            yield record


def write_run_outputs(run_dir: str | os.PathLike, results: dict[str, Any], records: Iterable[dict]) -> dict[str, Path]:
    """Write ``generations.jsonl``, ``results.md`` and ``results.json`` into ``run_dir``; return their paths.

    Each is written under a temporary name, synced and renamed, ``results.json`` last: a failure (a full disk, a
    file-size limit) leaves no half-written file under a final name, and ``results.json`` exists only when the
    evaluation's every output is complete."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "generations": run_dir / "generations.jsonl",
        "results": run_dir / "results.json",
        "markdown": run_dir / "results.md",
    }
    texts = {
        "generations": (json.dumps(record, ensure_ascii=False) + "\n" for record in records),
        "markdown": iter([results_markdown(results)]),
        "results": iter([json.dumps(results, indent=2, ensure_ascii=False) + "\n"]),
    }
    tmps = {name: path.with_name(f".{path.name}.tmp-{os.getpid()}") for name, path in paths.items()}
    try:
        for name, chunks in texts.items():
            with tmps[name].open("w", encoding="utf-8") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    for name in texts:  # every file is complete before the first is renamed; results.json last
        os.replace(tmps[name], paths[name])
    return paths


def results_markdown(results: dict[str, Any]) -> str:
    """A markdown table of one run: a row per dataset, mean ± std over seeds of every metric."""
    settings = results["settings"]
    bert = settings["bertscore"]
    metrics = list(METRICS if bert.get("enabled") else METRICS[:2])
    pooled = [m for m in DISTRIBUTION_METRICS if any(m in e for e in results["datasets"].values())]
    decoding = settings["decoding"]
    mode = "sampling" if decoding.get("do_sample", True) else "greedy"
    lines = [
        f"# Evaluation: {results['label']}",
        "",
        f"Model: `{results['model']['source']}`; seeds {', '.join(str(s) for s in settings['seeds'])}; "
        f"decoding: {mode}, temperature {decoding.get('temperature')}, top_p {decoding.get('top_p')}, "
        f"top_k {decoding.get('top_k')}, no_repeat_ngram_size {decoding.get('no_repeat_ngram_size')}, "
        f"max_new_tokens {decoding.get('max_new_tokens')}, prompts cut to {decoding.get('max_prompt_tokens')} tokens.",
    ]
    if bert.get("enabled"):
        lines.append(
            f"BERTScore: `{bert.get('model_type')}` layer {bert.get('num_layers')}, idf {bert.get('idf')}, "
            f"rescaled {bert.get('rescale_with_baseline')}, bert-score {bert.get('bert_score_version')}."
        )
    else:
        lines.append("BERTScore: skipped (bertscore.enabled=false).")
    lines += [
        "",
        "Mean ± sample std over seeds, 0-100.",
        "",
        "| dataset | rows | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for name, entry in results["datasets"].items():
        cells = " | ".join(summary_cell(entry.get(m)) for m in metrics)
        lines.append(f"| {name} | {entry['n_rows']} | {cells} |")
    if pooled:
        teacher = settings.get("teacher") or {}
        lines += [
            "",
            "Distribution-level metrics (one value per dataset, pooled over the seeds; fkl / rkl in nats per "
            "token and the head / tail recalls relative to the teacher's mass, teacher-forced on the references"
            + (f" with teacher `{teacher.get('source')}`, top-p {teacher.get('head_top_p')}" if teacher else "")
            + "; distinct-n and self-BLEU 0-100):",
            "",
            "| dataset | " + " | ".join(METRIC_TITLES[m] for m in pooled) + " |",
            "|---|" + "---:|" * len(pooled),
        ]
        for name, entry in results["datasets"].items():
            cells = " | ".join(f"{entry[m]['mean']:.4g}" if m in entry else "–" for m in pooled)
            lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"
