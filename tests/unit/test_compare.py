"""arkd.evaluation.compare and arkd-compare on fabricated run directories with known numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import arkd.cli.compare
from arkd.evaluation.compare import (
    CONTROLS,
    compare,
    control_role,
    find_run_dirs,
    load_run_records,
    paired_differences,
    strategy_label,
    strategy_name,
    summary_table,
)

REPO = Path(__file__).resolve().parents[2]
# Student's t quantiles (two-sided 95%), from statistical tables: df=2 and df=1.
T975_DF2 = 4.302652729911275
T975_DF1 = 12.706204736174705

POLICIES = {
    "fkl": {"_target_": "arkd.policy.ConstantAlpha", "alpha": 1.0},
    "rkl": {"_target_": "arkd.policy.ConstantAlpha", "alpha": 0.0},
    "akl": {"_target_": "arkd.policy.AKLHeuristic", "mu": 0.5},
    "learned": {"_target_": "arkd.policy.LearnedPolicy", "granularity": "sequence", "seed": 0},
}
# Rouge-L of the student after distillation, per strategy and seed (the known numbers the tests check against).
ROUGE = {
    "learned": {0: 30.0, 1: 32.0, 2: 34.0},
    "fkl": {0: 29.0, 1: 30.0, 2: 34.0},
    "rkl": {0: 31.0, 1: 35.0, 2: 36.0},
    "akl": {0: 20.0, 1: 21.0, 2: 25.0},
}
TEACHER = 50.0
BEFORE = {0: 10.0, 1: 12.0, 2: 14.0}


def _sample_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def make_run(
    root: Path,
    name: str,
    strategy: str,
    seed: int,
    rouge: float,
    *,
    hydra_choice: bool = True,
    alpha: list[float] | None = None,
    loss_target: str = "arkd.losses.BidirectionalKLLoss",
) -> Path:
    """A run directory as arkd-train writes it: config.yaml, report.json, .hydra/hydra.yaml, metrics.jsonl."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    policy = dict(POLICIES[strategy])
    config = {
        "name": "tiny",
        "seed": seed,
        "policy": policy,
        "loss": {"_target_": loss_target, "reduction": "sum"},
        "data": {"splits": {"_target_": "arkd.data.synthetic.synthetic_splits", "seed": 0}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    choice = strategy
    hydra = {"hydra": {"runtime": {"choices": {"policy": choice, "data": "synthetic", "loss": "bidirectional_kl"}}}}
    if hydra_choice:
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    summary = lambda v: {"mean": v, "std": None, "per_seed": {"10": v}}  # noqa: E731
    report = {
        "experiment": "tiny",
        "test_rows": 200,
        "results": {
            "teacher": {"rougeL": summary(TEACHER), "exact_match": summary(20.0)},
            "student_before": {"rougeL": summary(BEFORE[seed]), "exact_match": summary(1.0)},
            "student_after": {"rougeL": summary(rouge), "exact_match": summary(rouge / 10)},
        },
        "config": config,
    }
    (run / "report.json").write_text(json.dumps(report))
    rows = [{"step": s + 1, "loss": 1.0, "alpha_mean": a, "alpha_std": 0.1} for s, a in enumerate(alpha or [0.5])]
    rows.append({"step": len(rows), "split": "validation", "val_rougeL": rouge})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run


@pytest.fixture
def matrix(tmp_path: Path) -> Path:
    """4 strategies x 3 seeds, numbered like a Hydra multirun (0..11), strategies varying fastest."""
    root = tmp_path / "sweep"
    n = 0
    for seed in (0, 1, 2):
        for strategy in ("fkl", "rkl", "akl", "learned"):
            alpha = [0.5, 0.6, 0.7 + 0.05 * seed] if strategy == "learned" else None
            make_run(root, str(n), strategy, seed, ROUGE[strategy][seed], alpha=alpha)
            n += 1
    return root


def test_summary_table_mean_and_sample_std_over_seeds(matrix):
    records, incomplete = load_run_records([matrix])
    assert incomplete == []
    assert len([r for r in records if r["model"] == "student_after" and r["metric"] == "rougeL"]) == 12
    table = summary_table(records, "rougeL")
    assert list(table) == ["fkl", "rkl", "akl", "learned"]
    for strategy, by_seed in ROUGE.items():
        cell = table[strategy]["synthetic"]
        values = [by_seed[s] for s in (0, 1, 2)]
        assert cell["seeds"] == [0, 1, 2] and cell["values"] == values and cell["n"] == 3
        assert cell["mean"] == pytest.approx(sum(values) / 3)
        assert cell["std"] == pytest.approx(_sample_std(values))
    # learned: 30, 32, 34 -> mean 32, std 2 (by hand)
    assert table["learned"]["synthetic"]["mean"] == pytest.approx(32.0)
    assert table["learned"]["synthetic"]["std"] == pytest.approx(2.0)
    teacher = summary_table(records, "rougeL", model="teacher")
    assert next(iter(teacher.values()))["synthetic"]["values"] == [TEACHER] * 3


def test_paired_differences_against_hand_computed_t_intervals(matrix):
    records, _ = load_run_records([matrix])
    diffs = {d["strategy"]: d for d in paired_differences(records, "rougeL", reference="learned")}
    assert set(diffs) == {"fkl", "rkl", "akl"}
    # learned - fkl = [1, 2, 0]: mean 1, std 1, half-width t(0.975, 2) * 1 / sqrt(3)
    fkl = diffs["fkl"]
    half = T975_DF2 * 1.0 / math.sqrt(3)
    assert fkl["n"] == 3 and fkl["seeds"] == [0, 1, 2]
    assert fkl["mean"] == pytest.approx(1.0) and fkl["std"] == pytest.approx(1.0)
    assert fkl["low"] == pytest.approx(1.0 - half, abs=1e-9) and fkl["high"] == pytest.approx(1.0 + half, abs=1e-9)
    assert not fkl["significant"]
    # learned - rkl = [-1, -3, -2]: mean -2, std 1 -> [-2 - half, -2 + half] = [-4.48, 0.48]: not significant
    rkl = diffs["rkl"]
    assert rkl["mean"] == pytest.approx(-2.0) and rkl["low"] == pytest.approx(-2.0 - half, abs=1e-9)
    assert rkl["high"] == pytest.approx(-2.0 + half, abs=1e-9) and not rkl["significant"]
    # learned - akl = [10, 11, 9]: mean 10, std 1 -> clearly above 0
    akl = diffs["akl"]
    assert akl["mean"] == pytest.approx(10.0) and akl["low"] == pytest.approx(10.0 - half, abs=1e-9)
    assert akl["significant"]
    # 90% interval: narrower (t(0.95, 2) = 2.919985580)
    narrow = {d["strategy"]: d for d in paired_differences(records, "rougeL", confidence=0.9)}["fkl"]
    assert narrow["high"] == pytest.approx(1.0 + 2.919985580 / math.sqrt(3), abs=1e-8)


def test_paired_differences_use_only_shared_seeds(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        make_run(root, f"l{seed}", "learned", seed, ROUGE["learned"][seed])
    for seed in (0, 2):  # fkl seed 1 is missing
        make_run(root, f"f{seed}", "fkl", seed, ROUGE["fkl"][seed])
    make_run(root, "a0", "akl", 0, 20.0)  # a single shared seed: no interval
    records, _ = load_run_records([root])
    diffs = {d["strategy"]: d for d in paired_differences(records)}
    # learned - fkl on seeds 0 and 2: [1, 0] -> mean 0.5, std sqrt(0.5), half = t(0.975, 1) * std / sqrt(2)
    fkl = diffs["fkl"]
    assert fkl["seeds"] == [0, 2] and fkl["n"] == 2 and fkl["mean"] == pytest.approx(0.5)
    assert fkl["std"] == pytest.approx(math.sqrt(0.5))
    assert fkl["high"] == pytest.approx(0.5 + T975_DF1 * math.sqrt(0.5) / math.sqrt(2), abs=1e-8)
    akl = diffs["akl"]
    assert akl["n"] == 1 and akl["mean"] == pytest.approx(10.0) and math.isnan(akl["low"]) and not akl["significant"]
    assert paired_differences(records, reference="todi") == []


def test_strategy_label_from_config_and_hydra_choices():
    # Runs without a recorded strategy block: the preset (Hydra's choice) and the run's own policy.* overrides.
    constant = {"_target_": "arkd.policy.ConstantAlpha"}
    assert strategy_label({"policy": {**constant, "alpha": 1.0}}, {"policy": "fkl"}) == "fkl"
    assert strategy_label({"policy": {**constant, "alpha": 0.25}}, {"policy": "constant"}, ["policy.alpha=0.25"]) == (
        "constant[alpha=0.25]"
    )
    assert strategy_label({"policy": {"_target_": "arkd.policy.GreedySearch"}}, {"policy": "greedy"}) == "greedy"
    assert strategy_label({"policy": {"_target_": "arkd.policy.LearnedPolicy"}}, {"policy": "my_arkd"}) == "my_arkd"
    # without Hydra's record: the class and its options, never a table of class names
    assert strategy_label({"policy": {**constant, "alpha": 1.0}}) == "ConstantAlpha(alpha=1.0)"
    # a loss that ignores alpha (by the loss class's own declaration) names the run
    jsd = {"policy": {**constant, "alpha": 0.5}, "loss": {"_target_": "arkd.losses.GeneralizedJSDLoss"}}
    assert strategy_label(jsd, {"loss": "generalized_jsd"}) == "loss=generalized_jsd"
    with pytest.raises(ValueError, match="no 'policy' node"):
        strategy_label({"seed": 0})
    # an explicit label (variants of one strategy in a sweep) wins over everything
    frozen = {"policy": {"_target_": "arkd.policy.LearnedPolicy", "lr": 0.0}, "label": "learned_frozen"}
    assert strategy_label(frozen, {"policy": "learned"}) == "learned_frozen"
    assert strategy_label({**jsd, "label": "gkd"}, {"loss": "generalized_jsd"}) == "gkd"
    assert strategy_label({**frozen, "label": None}, {"policy": "learned"}) == "learned"


def test_strategy_name_rule():
    assert strategy_name("learned") == "learned"
    assert strategy_name("learned", ["policy.lr=0", "seed=3", "optimizer.lr=1e-3"]) == "learned[lr=0]"
    assert strategy_name("learned", ["policy.lr=0"], label="frozen") == "frozen"
    assert strategy_name("learned", loss="forward_kl", takes_alpha=False) == "loss=forward_kl"


def test_loss_without_a_class_or_declaration_is_named_as_a_loss_and_other_errors_propagate(monkeypatch):
    import arkd.losses
    from arkd import naming

    policy = {"policy": {"_target_": "arkd.policy.ConstantAlpha", "alpha": 0.5}}
    for target in ("arkd.losses.NoSuchLoss", "builtins.dict"):  # not importable; not a declared arkd loss
        assert strategy_label({**policy, "loss": {"_target_": target}}, {"loss": "mine"}) == "loss=mine"
    assert naming._loss_takes_alpha("arkd.losses.BidirectionalKLLoss") is True

    def broken(loss):
        raise RuntimeError("a bug in the declaration reader")

    monkeypatch.setattr(arkd.losses, "loss_capabilities", broken)
    with pytest.raises(RuntimeError, match="a bug in the declaration reader"):  # not swallowed
        naming._loss_takes_alpha("arkd.losses.BidirectionalKLLoss")


def test_a_recorded_strategy_block_names_the_run(tmp_path):
    run = make_run(tmp_path / "runs", "0", "learned", 0, 30.0)
    report = json.loads((run / "report.json").read_text())
    report["strategy"] = {"name": "learned[lr=0]", "preset": "learned", "overrides": ["policy.lr=0"]}
    (run / "report.json").write_text(json.dumps(report))
    records, _ = load_run_records([tmp_path / "runs"])
    assert {r["strategy"] for r in records} == {"learned[lr=0]"}


def test_policy_presets_compose_to_constant_alpha():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from arkd.config_paths import config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            for preset, alpha, label in (("fkl", 1.0, "fkl"), ("rkl", 0.0, "rkl"), ("constant", 0.5, "constant")):
                cfg = compose(config_name="train", overrides=["config=tiny", f"policy={preset}"])
                policy = OmegaConf.to_container(cfg.policy, resolve=True)
                assert policy == {"_target_": "arkd.policy.ConstantAlpha", "alpha": alpha}
                assert strategy_label(OmegaConf.to_container(cfg, resolve=True), {"policy": preset}) == label
    finally:
        GlobalHydra.instance().clear()


def test_labels_without_hydra_record_and_duplicate_runs_are_an_error(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a", "fkl", 0, 29.0, hydra_choice=False)  # no .hydra/: named by the policy's class and options
    records, _ = load_run_records([root])
    assert {r["strategy"] for r in records} == {"ConstantAlpha(alpha=1.0)"}
    assert {r["dataset"] for r in records} == {"synthetic"}  # from data.splits._target_
    make_run(root, "b", "fkl", 0, 30.0)
    make_run(root, "c", "fkl", 0, 31.0)
    with pytest.raises(ValueError, match=r"two runs have strategy 'fkl' and seed 0 \(.*b and .*c\)"):
        load_run_records([root])


def test_incomplete_runs_are_listed_and_bad_files_named(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "0", "learned", 0, 30.0)
    running = root / "1"
    running.mkdir()
    (running / "config.yaml").write_text("seed: 1\n")
    complete, incomplete = find_run_dirs([root])
    assert complete == [root / "0"] and incomplete == [running]
    records, incomplete = load_run_records([root])
    assert incomplete == [running] and {r["run"] for r in records} == {str(root / "0")}
    (root / "0" / "report.json").write_text('{"results": ')
    with pytest.raises(ValueError, match=r"report\.json, line 1: not valid JSON"):
        load_run_records([root])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_run_records([tmp_path / "absent"])
    with pytest.raises(ValueError, match="no run directory with a report.json"):
        load_run_records([running])


def _results_json(dataset: str, bertscore: float, rouge: float) -> dict:
    summary = lambda v: {"mean": v, "std": None, "per_seed": {"10": v}}  # noqa: E731
    return {
        "schema_version": 1,
        "created_utc": "2026-11-23T12:00:00+00:00",
        "label": "student",
        "model": {"source": "best"},
        "settings": {"seeds": [10], "decoding": {}, "bertscore": {"enabled": True}},
        "versions": {"torch": "2", "transformers": "5", "rouge-score": "0.1", "bert-score": "0.3"},
        "datasets": {
            dataset: {
                "source": f"{dataset}.jsonl",
                "n_rows": 10,
                "rougeL": summary(rouge),
                "exact_match": summary(0.0),
                "bertscore_f1": summary(bertscore),
            }
        },
    }


def test_arkd_eval_results_below_a_run_add_datasets_and_bertscore(tmp_path):
    root = tmp_path / "runs"
    for i, (strategy, scores) in enumerate((("learned", (60.0, 62.0)), ("fkl", (58.0, 61.0)))):
        for seed, score in enumerate(scores):
            run = make_run(root, f"{i}{seed}", strategy, seed, 30.0)
            (run / "eval").mkdir()
            (run / "eval" / "results.json").write_text(json.dumps(_results_json("dolly", score, 20.0 + seed)))
    result = compare([root], reference="learned")
    assert result["metrics"] == ["rougeL", "bertscore_f1", "exact_match"]
    assert result["datasets"]["bertscore_f1"] == ["dolly"]
    assert result["datasets"]["rougeL"] == ["synthetic", "dolly"]
    cell = result["tables"]["bertscore_f1"]["learned"]["dolly"]
    assert cell["mean"] == pytest.approx(61.0) and cell["std"] == pytest.approx(math.sqrt(2.0))
    (diff,) = result["differences"]["bertscore_f1"]
    assert diff["strategy"] == "fkl" and diff["mean"] == pytest.approx(1.5)  # [2, 1]
    with pytest.raises(ValueError, match="no run has metric"):
        compare([root], metrics=["bleu"])


def _load_script():
    return arkd.cli.compare


def test_cli_writes_table_json_and_figures(matrix, tmp_path, capsys):
    out = tmp_path / "out"
    assert _load_script().main([str(matrix), "--out", str(out)]) == 0
    for name in ("comparison.md", "comparison.json", "heatmap.png", "alpha_trajectory.png", "alpha_strategies.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "comparison.md").read_text()
    assert "| learned | 32.00 ± 2.00 | 3 |" in markdown
    assert "| rkl | **34.00 ± 2.65** | 3 |" in markdown  # best mean in bold; std of 31, 35, 36
    assert "| *teacher* | 50.00 ± 0.00 | 3 |" in markdown
    assert "| *student before distillation* | 12.00 ± 2.00 | 3 |" in markdown
    half = T975_DF2 / math.sqrt(3)
    assert f"| akl | synthetic | 3 | +10.00 * † | 1.00 | [{10 - half:.2f}, {10 + half:.2f}] |" in markdown
    assert f"| fkl | synthetic | 3 | +1.00 | 1.00 | [{1 - half:.2f}, {1 + half:.2f}] |" in markdown
    data = json.loads((out / "comparison.json").read_text())  # strict JSON (no NaN)
    assert data["strategies"] == ["fkl", "rkl", "akl", "learned"]
    assert data["tables"]["rougeL"]["akl"]["synthetic"]["values"] == [20.0, 21.0, 25.0]
    assert len(data["records"]) == 12 * 6  # 12 runs x 3 models x 2 metrics
    assert "learned − strategy" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_sentence(tmp_path, capsys):
    assert _load_script().main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("arkd-compare: ") and "no such directory" in err and "Traceback" not in err
    assert _load_script().main([str(tmp_path), "--out", str(tmp_path / "o"), "--confidence", "95"]) == 2
    assert "--confidence 95.0" in capsys.readouterr().err


def test_omnibus_ranks_and_holm_in_comparison_json(matrix, tmp_path):
    from arkd.evaluation.stats import holm_adjust, paired_t_p_value

    out = tmp_path / "cmp"
    compare([matrix], out, metrics=["rougeL"])
    data = json.loads((out / "comparison.json").read_text())
    # Friedman by hand over 3 seeds x 4 strategies (fkl, rkl, akl, learned), ranks ascending within each seed:
    # seed 0: 29, 31, 20, 30 -> 2, 4, 1, 3; seed 1: 30, 35, 21, 32 -> 2, 4, 1, 3;
    # seed 2: 34, 36, 25, 34 -> 2.5, 4, 1, 2.5
    n, k = 3, 4
    sums = [6.5, 12, 3, 8.5]
    plain = 12.0 / (n * k * (k + 1)) * sum(r * r for r in sums) - 3 * n * (k + 1)
    ties = 1 - (2**3 - 2) / (n * (k**3 - k))  # one tie of two in one seed
    omnibus = data["omnibus"]["rougeL"]
    assert omnibus["test"] == "friedman" and omnibus["n_strategies"] == 4 and omnibus["n_seeds"] == 3
    assert omnibus["statistic"] == pytest.approx(plain / ties)
    assert 0 < omnibus["p_value"] < 0.05
    ranks = data["ranks"]["rougeL"]["synthetic"]
    assert ranks["ranks"]["rkl"] == [1, 1, 1] and ranks["ranks"]["akl"] == [4, 4, 4]
    assert ranks["ranks"]["learned"] == [2, 2, 2.5] and ranks["mean_rank"]["fkl"] == pytest.approx(8.5 / 3)
    diffs = {d["strategy"]: d for d in data["differences"]["rougeL"]}
    ps = [paired_t_p_value([ROUGE["learned"][s] for s in range(3)], [ROUGE[o][s] for s in range(3)]) for o in diffs]
    for d, p, adjusted in zip(diffs.values(), ps, holm_adjust(ps)):
        assert d["p_value"] == pytest.approx(p) and d["holm_p"] == pytest.approx(adjusted)
        assert d["holm_low"] <= d["low"] and d["holm_high"] >= d["high"]  # Holm's intervals are never narrower
    text = (out / "comparison.md").read_text()
    assert text.index("Omnibus tests") < text.index("Paired difference")


def test_controls_are_named_in_the_tables(tmp_path):
    root = tmp_path / "sweep"
    n = 0
    for seed in (0, 1, 2):
        for strategy, label in (("learned", None), ("learned", "learned_frozen"), ("fkl", "constant_at_learned_mean")):
            run = make_run(root, str(n), strategy, seed, 30.0 + seed + n % 3)
            if label:
                report = json.loads((run / "report.json").read_text())
                report["strategy"] = {"name": label}
                (run / "report.json").write_text(json.dumps(report))
            n += 1
    result = compare([root], tmp_path / "cmp", metrics=["rougeL"])
    assert set(result["controls"]) == {"learned_frozen", "constant_at_learned_mean"}
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "learned_frozen (*A/A noise floor*)" in text
    assert "constant_at_learned_mean (*adapting control*)" in text
    assert control_role("learned[lr=0]") == CONTROLS["learned_frozen"] and control_role("learned[lr=0.01]") is None


def test_the_best_mean_is_bold_in_the_metrics_direction():
    """Rouge-L: the highest mean in bold; FKL (lower is better): the lowest; a trade-off metric (tail recall): none."""
    from arkd.evaluation.compare.render import _table_lines

    def result(metric):
        rows = {"fkl": {"d": {"mean": 5.0, "std": 0.1, "n": 3}}, "rkl": {"d": {"mean": 7.0, "std": 0.2, "n": 3}}}
        return {"tables": {metric: rows}, "datasets": {metric: ["d"]}, "reference_models": {}}

    def bold(metric):
        return [line.split(" |")[0][2:] for line in _table_lines(result(metric), metric, {}) if "**" in line]

    assert bold("rougeL") == ["rkl"]
    assert bold("fkl") == ["fkl"] and bold("rkl") == ["fkl"]
    assert bold("tail_recall") == []
