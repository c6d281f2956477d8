"""The end-of-run report: teacher, student before distillation and student after, on the held-out test split.

Writes ``report.json`` (every number and what it depends on), ``report.md`` (a table a person reads) and
``alpha_trajectory.png`` (alpha mean +- std over training, from ``metrics.jsonl``) into the run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import arkd
from arkd.evaluation.results import DISTRIBUTION_METRICS, METRIC_TITLES, REPORT_MODELS, SCHEMA_VERSION, summary_cell

MODELS = REPORT_MODELS
LABELS = {
    "teacher": "teacher",
    "student_before": "student before distillation",
    "student_after": "student after distillation",
}


def _evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    cfg: DictConfig,
    label: str,
    teacher: torch.nn.Module | None = None,
):
    from arkd.evaluation import DecodingConfig, evaluate_model
    from arkd.evaluation.results import DISTRIBUTION_METRICS

    final = cfg.report
    decoding = DecodingConfig(
        do_sample=bool(final.do_sample),
        max_new_tokens=int(final.max_new_tokens),
        max_prompt_tokens=int(cfg.data.max_prompt_length),
    )
    result = evaluate_model(
        model,
        tokenizer,
        examples,
        seeds=[int(s) for s in final.seeds],
        batch_size=int(final.batch_size),
        decoding=decoding,
        progress=True,
        desc=label,
        teacher=teacher,
        head_top_p=float(final.get("head_top_p", 0.9)),
        diversity=bool(final.get("diversity", True)),
    )
    keys = ("rougeL", "exact_match", *DISTRIBUTION_METRICS)
    scores = {key: result[key] for key in keys if key in result}
    return scores, result["decoding"], result["generations"], result["rows_per_process"]


def final_report(
    cfg: DictConfig,
    *,
    run_dir: Path,
    tokenizer: Any,
    test_examples: Sequence[Any],
    teacher: torch.nn.Module | None,
    student_before: Callable[[], torch.nn.Module],
    summary: dict[str, Any],
    accelerator: Any,
) -> dict[str, Any] | None:
    """Evaluate the three models on the test split (the rows shared over the processes) and write the report files
    (main process).

    Args:
        cfg: the run's config (``report``: subset, seeds, do_sample, max_new_tokens, batch_size, student).
        run_dir: the run directory (``best/``, ``final/`` and ``metrics.jsonl`` are read from it).
        tokenizer: the tokenizer.
        test_examples: the test split.
        teacher: the teacher (None: not evaluated).
        student_before: builds the student as it was before training (the SFT'd student of the tiny job).
        summary: the training summary (steps, time, best validation Rouge-L) recorded in the report.
        accelerator: the run's accelerator (every process generates its share; only the main process writes).

    Returns:
        The report dict on the main process, None elsewhere.
    """
    from arkd.models import load_model

    if not test_examples:
        raise ValueError("report.enabled is true but data.splits gave no 'test' rows: expected a test split.")
    final = cfg.report
    examples = list(test_examples)[: final.subset] if final.subset else list(test_examples)
    after_dir = run_dir / "best" if final.student == "best" and (run_dir / "best").is_dir() else run_dir / "final"
    device = accelerator.device
    results: dict[str, Any] = {}
    samples: dict[str, list[str]] = {}
    decoding: dict[str, Any] = {}
    rows_per_process: list[int] = [len(examples)]
    started = time.perf_counter()
    builders: dict[str, Callable[[], torch.nn.Module] | None] = {
        "teacher": (lambda: teacher) if teacher is not None else None,
        "student_before": student_before,
        "student_after": lambda: load_model(after_dir),
    }
    # report.models leaves out models whose scores are the same in every run of a sweep (the teacher; a student
    # before that does not depend on the seed); the teacher still serves as the students' reference.
    chosen = set(final.get("models") or MODELS)
    builders = {name: build if name in chosen else None for name, build in builders.items()}
    # Every process evaluates (evaluate_model shares the rows over them); the main process writes.
    for name, build in builders.items():
        if build is None:
            continue
        model = accelerator.unwrap_model(build()).to(device).eval()
        # The students' distribution is measured against the teacher (teacher-forced on the references).
        reference = None
        if name != "teacher" and teacher is not None:
            reference = accelerator.unwrap_model(teacher).to(device).eval()
        results[name], decoding, generations, rows_per_process = _evaluate(
            model, tokenizer, examples, cfg, LABELS[name], teacher=reference
        )
        samples[name] = generations[next(iter(generations))][:5]
        if name != "teacher":
            del model
    report = None
    if accelerator.is_main_process:
        report = {
            "schema_version": SCHEMA_VERSION,  # the schema shared with arkd-eval's results.json
            "arkd_version": arkd.__version__,
            "experiment": str(cfg.name),
            "strategy": summary.get("strategy"),
            "run_dir": str(run_dir),
            "test_rows": len(examples),
            "seeds": [int(s) for s in cfg.report.seeds],
            "decoding": decoding,
            "num_processes": accelerator.num_processes,
            "rows_per_process": rows_per_process,
            "head_top_p": float(cfg.report.get("head_top_p", 0.9)),
            "student_after": after_dir.name,
            "student_after_step": summary.get("best_step") if after_dir.name == "best" else summary.get("steps"),
            "results": results,
            "training": {k: v for k, v in summary.items() if k not in ("report", "strategy")},
            "eval_seconds": round(time.perf_counter() - started, 1),
            "examples": [
                {
                    "prompt": ex.prompt,
                    "reference": ex.references[0],
                    **{name: samples[name][i] for name in samples if i < len(samples[name])},
                }
                for i, ex in enumerate(examples[:5])
            ],
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        report["alpha_signal"] = _alpha_signal(run_dir, cfg)
        (run_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        plot = _alpha_plot(run_dir)
        (run_dir / "report.md").write_text(report_markdown(report, plot))
    accelerator.wait_for_everyone()
    return report


def _alpha_plot(run_dir: Path) -> Path | None:
    from arkd.evaluation.plots import plot_alpha_trajectory
    from arkd.run_log import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    if not any(isinstance(r.get("alpha_mean"), (int, float)) for r in rows):
        return None
    return plot_alpha_trajectory(rows, run_dir / "alpha_trajectory.png", title="alpha (weight of FKL) over training")


def _alpha_signal(run_dir: Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The ``alpha_signal`` block: the alpha-signal probe's summary over the run (None without probes)."""
    from arkd.policy.probe import summarize
    from arkd.run_log import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    probe = cfg.get("probe")
    window = int(probe.get("window", 6)) if probe is not None and probe.get("window") is not None else 6
    return summarize(read_metrics(path), window)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def report_markdown(report: dict[str, Any], plot: Path | None = None) -> str:
    """The report as markdown: the three models' Rouge-L and exact match, the set-up, a few generations."""
    decoding = report["decoding"]
    mode = "sampling (temperature 1, top_p 1, top_k 0)" if decoding.get("do_sample") else "greedy decoding"
    training = report["training"]
    lines = [
        f"# arkd report: {report['experiment']}",
        "",
        f"Test split: {report['test_rows']} held-out rows; {mode}, max {decoding.get('max_new_tokens')} new tokens, "
        f"no_repeat_ngram_size {decoding.get('no_repeat_ngram_size')}; seeds {', '.join(map(str, report['seeds']))} "
        "(mean ± std over seeds).",
        "",
        "| model | Rouge-L | exact match |",
        "|---|---|---|",
    ]
    for name in MODELS:
        if name in report["results"]:
            row = report["results"][name]
            lines.append(f"| {LABELS[name]} | {summary_cell(row['rougeL'])} | {summary_cell(row['exact_match'])} |")
    pooled = [m for m in DISTRIBUTION_METRICS if any(m in row for row in report["results"].values())]
    if pooled:
        lines += [
            "",
            "Distribution-level metrics (pooled over seeds; fkl / rkl nats per token and head / tail recall relative "
            f"to the teacher, teacher-forced on the references, top-p {report.get('head_top_p', 0.9)}; distinct-n and "
            "self-BLEU 0-100):",
            "",
            "| model | " + " | ".join(METRIC_TITLES[m] for m in pooled) + " |",
            "|---|" + "---:|" * len(pooled),
        ]
        for name in MODELS:
            row = report["results"].get(name)
            if row:
                cells = " | ".join(f"{row[m]['mean']:.4g}" if m in row else "–" for m in pooled)
                lines.append(f"| {LABELS[name]} | {cells} |")
    results = report["results"]
    if "student_before" in results and "student_after" in results:
        gain = results["student_after"]["rougeL"]["mean"] - results["student_before"]["rougeL"]["mean"]
        lines += ["", f"Distillation changed the student's Rouge-L by {gain:+.2f} points."]
    lines += [
        "",
        f"Student after: `{report['student_after']}/` (step {report['student_after_step']}); "
        f"{training.get('steps')} steps in {training.get('train_seconds', 0):.0f} s, "
        f"{training.get('skipped_steps', 0)} skipped; best {training.get('best_metric')} "
        f"{training.get('best_value')}.",
    ]
    if training.get("rollout"):
        share = training.get("rollout_share")
        lines += [
            "",
            f"Rollout `{training['rollout']}`: generation took {training.get('rollout_seconds', 0):.1f} s"
            + (f", {100 * share:.1f}% of the training time." if share is not None else "."),
        ]
    signal = report.get("alpha_signal")
    if signal and signal.get("horizon_probes"):
        agree = signal.get("horizon_one_step_agreement")
        t = _fmt(signal.get("horizon_slope_t"))
        agreement = (
            "" if agree is None else f"; its sign agrees with the one-step probe's in {100 * agree:.0f} % of probes"
        )
        lines += [
            "",
            f"Horizon probe: {signal['horizon_probes']} probes of {signal['horizon']} real steps each; mean d reward / "
            f"d alpha on the reward split {signal['horizon_mean_slope']:+.3g} (t = {t}){agreement}.",
        ]
    if signal and signal.get("probes"):
        agreement = signal.get("sign_agreement")
        drift = signal.get("policy_alpha_drift")
        lines += [
            "",
            "## Alpha signal (the probe: does alpha matter, and which way?)",
            "",
            f"{signal['probes']} probes; mean d reward / d alpha on the next batch {signal['mean_slope']:+.3g} "
            f"(t = {_fmt(signal.get('slope_t'))} over all probes); {signal['significant_windows']} of "
            f"{signal['windows']} windows of {signal['window']} probes with |t| > 2"
            + (f", {100 * agreement:.0f} % of them with the majority sign" if agreement is not None else "")
            + f". Same batch: {_fmt(signal.get('mean_slope_same'), '+.3g')}. "
            f"Policy alpha drift (last 20 % of steps minus first 20 %): {_fmt(drift, '+.3f')}.",
        ]
    if plot is not None:
        lines += ["", f"![alpha trajectory]({plot.name})"]
    if report.get("examples"):
        lines += ["", "## First test rows", ""]
        for example in report["examples"][:3]:
            lines.append(f"- reference: `{example['reference']}`")
            for name in MODELS:
                if name in example:
                    lines.append(f"  - {LABELS[name]}: `{example[name]}`")
    return "\n".join(lines) + "\n"
