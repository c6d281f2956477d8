"""results.json schema, the markdown report, aggregation of arkd-eval runs by arkd-compare, and the plots."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest

from arkd.evaluation import (
    build_results,
    plot_alpha_trajectory,
    plot_dynamics,
    plot_heatmap,
    results_markdown,
    summarize,
    validate_results,
    write_run_outputs,
)
from arkd.evaluation.generation import DecodingConfig
from arkd.evaluation.reports import generation_records
from arkd.run_log import read_metrics

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(rouge: dict[int, float], em: dict[int, float], bert: dict[int, float] | None = None) -> dict:
    report = {
        "source": "data/x.jsonl",
        "max_rows": None,
        "n_rows": 2,
        "seeds": list(rouge),
        "rougeL": summarize(rouge),
        "exact_match": summarize(em),
        "generations": {str(s): ["a", "b"] for s in rouge},
        "per_row": {str(s): {"rougeL": [0.5, 0.25]} for s in rouge},
    }
    if bert is not None:
        report["bertscore_f1"] = summarize(bert)
    return report


def _results(label: str, base: float, *, bert: bool = True, seeds=(10, 20)) -> dict:
    datasets = {
        name: _report(
            {s: base + i + 0.1 * k for k, s in enumerate(seeds)},
            {s: 1.0 for s in seeds},
            {s: 80.0 + base / 10 for s in seeds} if bert else None,
        )
        for i, name in enumerate(("dolly", "sni"))
    }
    settings = {
        "seeds": list(seeds),
        "batch_size": 8,
        "decoding": DecodingConfig().to_dict(),
        "bertscore": {"enabled": bert, "model_type": "roberta-large", "num_layers": 17} if bert else {"enabled": False},
    }
    return build_results(
        datasets, label=label, model={"source": f"runs/{label}"}, settings=settings, environment={"platform": "test"}
    )


def test_summarize_mean_and_sample_std():
    summary = summarize({10: 20.0, 20: 22.0, 30: 27.0})
    assert summary["mean"] == 23.0
    assert summary["std"] == pytest.approx(math.sqrt(((3**2) + 1 + 16) / 2), abs=1e-4)
    assert summary["per_seed"] == {"10": 20.0, "20": 22.0, "30": 27.0}
    assert summarize({10: 5.0})["std"] is None


def test_results_schema_and_files(tmp_path):
    results = _results("arkd", 20.0)
    assert results["schema_version"] == 1 and results["label"] == "arkd"
    assert set(results["datasets"]) == {"dolly", "sni"}
    dolly = results["datasets"]["dolly"]
    assert set(dolly) == {"source", "n_rows", "max_rows", "rougeL", "exact_match", "bertscore_f1"}
    assert "generations" not in dolly and "per_row" not in dolly
    for package in ("torch", "transformers", "rouge-score", "bert-score", "python"):
        assert results["versions"][package]
    assert "use_stemmer=True" in results["settings"]["rouge"]["implementation"]
    examples = [
        type("E", (), {"prompt": "p1", "references": ["r1"]})(),
        type("E", (), {"prompt": "p2", "references": ["r2"]})(),
    ]
    records = list(generation_records("dolly", examples, _report({10: 1.0}, {10: 0.0})))
    expected = {"dataset": "dolly", "seed": 10, "row": 0, "prompt": "p1", "references": ["r1"], "generation": "a"}
    assert records[0] == {**expected, "rougeL": 0.5}
    paths = write_run_outputs(tmp_path / "run", results, records)
    loaded = json.loads(paths["results"].read_text())
    validate_results(loaded)
    assert loaded == results
    assert [json.loads(line)["row"] for line in paths["generations"].read_text().splitlines()] == [0, 1]
    markdown = paths["markdown"].read_text()
    assert "| dolly | 2 | 20.05 ± 0.07 | 1.00 ± 0.00 | 82.00 ± 0.00 |" in markdown
    assert "roberta-large" in markdown


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("schema_version",), "missing key 'schema_version'"),
        (("settings", "seeds"), "missing key 'seeds'"),
        (("datasets", "dolly", "rougeL"), r"datasets\.dolly: missing key 'rougeL'"),
        (("datasets", "sni", "bertscore_f1"), r"datasets\.sni: missing key 'bertscore_f1'"),
        (("versions", "bert-score"), "missing key 'bert-score'"),
    ],
)
def test_validate_results_names_the_missing_key(path, message):
    results = copy.deepcopy(_results("arkd", 20.0))
    node = results
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(ValueError, match=message):
        validate_results(results)


def test_validate_results_rejects_bad_values():
    results = _results("arkd", 20.0)
    bad = copy.deepcopy(results)
    bad["datasets"]["dolly"]["rougeL"]["mean"] = 140.0
    with pytest.raises(ValueError, match="out of range"):
        validate_results(bad)
    bad = copy.deepcopy(results)
    bad["datasets"]["dolly"]["rougeL"]["per_seed"] = {"10": 1.0}
    with pytest.raises(ValueError, match="per_seed keys differ"):
        validate_results(bad)
    no_bert = _results("fkl", 18.0, bert=False)
    validate_results(no_bert)  # BERTScore is optional only when the run says it was skipped
    assert "skipped" in results_markdown(no_bert)


def test_arkd_compare_aggregates_eval_runs(tmp_path, capsys):
    # arkd-eval runs given on their own (no training run around them): one row per label, one column per dataset.
    from arkd.cli.compare import main as compare_main
    from arkd.evaluation.compare import load_run_records

    root = tmp_path / "eval"
    for label, base in (("FKL", 20.0), ("RKL", 21.0), ("ARKD", 22.5)):
        write_run_outputs(root / label, _results(label, base), [])
    records, incomplete = load_run_records([root])
    assert not incomplete and len(records) == 3 * 2 * 3  # runs x datasets x (rougeL, bertscore_f1, exact_match)
    arkd = {(r["dataset"], r["metric"]): r["value"] for r in records if r["strategy"] == "ARKD"}
    assert arkd[("sni", "rougeL")] == pytest.approx(23.55)
    out = tmp_path / "aggregate"
    assert compare_main([str(root), "--out", str(out), "--reference", "ARKD"]) == 0
    markdown = (out / "comparison.md").read_text()
    assert (
        "| ARKD | **22.55** | **23.55** | 1 |" in markdown
        and "| FKL | dolly | 1 | +2.50 |" in markdown
        and "## BERTScore F1" in markdown
    )
    assert (out / "heatmap.png").read_bytes()[:8] == PNG_MAGIC
    write_run_outputs(tmp_path / "twice" / "a", _results("FKL", 20.0), [])
    write_run_outputs(tmp_path / "twice" / "b", _results("FKL", 21.0), [])
    with pytest.raises(ValueError, match="two runs have strategy 'FKL'"):
        load_run_records([tmp_path / "twice"])
    capsys.readouterr()


def test_heatmap_checks_its_shape(tmp_path):
    path = plot_heatmap(["a", "b"], ["x"], [[1.0], [None]], tmp_path / "h.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="2 rows x 1 columns"):
        plot_heatmap(["a", "b"], ["x"], [[1.0]], tmp_path / "bad.png")


def _fabricated_metrics(path: Path, *, with_alpha: bool = True) -> Path:
    lines = []
    for step in range(0, 60, 5):
        row = {
            "step": step,
            "loss": 2.0 - step / 100,
            "fkl": 1.5 - step / 80,
            "rkl": 1.2 - step / 90,
            "alpha_mean": 0.5 + 0.3 * math.sin(step / 10) if with_alpha else None,
            "alpha_std": 0.1 if with_alpha else None,
            "reward": 0.01 * (step % 3) if step % 10 == 0 else None,
            "policy_entropy": 0.6,
            "lr": 1e-4,
            "tokens_per_sec": 1000.0,
        }
        lines.append(json.dumps(row))
        if step % 20 == 0:
            lines.append(json.dumps({"step": step, "split": "validation", "val_loss": 1.9, "val_rougeL": 12.0}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_plots_and_script(tmp_path):
    metrics = _fabricated_metrics(tmp_path / "metrics.jsonl")
    rows = read_metrics(metrics)
    assert len(rows) == 12 + 3
    assert plot_alpha_trajectory(rows, tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_dynamics(rows, tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC
    script = _script("plot_training")
    assert script.main([str(tmp_path), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "alpha_trajectory.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "fig" / "dynamics.png").read_bytes()[:8] == PNG_MAGIC


def test_training_plots_reject_runs_without_the_data(tmp_path):
    rows = read_metrics(_fabricated_metrics(tmp_path / "m.jsonl", with_alpha=False))
    with pytest.raises(ValueError, match="alpha_mean"):
        plot_alpha_trajectory(rows, tmp_path / "a.png")
    plot_dynamics(rows, tmp_path / "d.png")  # reward/FKL/RKL are there
    with pytest.raises(ValueError, match="'reward', 'fkl' or 'rkl'"):
        plot_dynamics([{"step": 1, "loss": 1.0}], tmp_path / "e.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{"step": 2,\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        read_metrics(bad)
