"""arkd.run_log.MetricsLogger: metrics.jsonl rows, resume truncation, and the wandb mirror in offline mode."""

from __future__ import annotations

import json

import pytest

from arkd.run_log import MetricsLogger, read_metrics


def test_rows_resume_and_disabled(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    # A run resumed from step 2 drops the rows written after it, then appends.
    resumed = MetricsLogger(tmp_path, resume=True, resume_step=2)
    resumed.log({"step": 3, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    MetricsLogger(tmp_path / "other", enabled=False).log({"step": 1})
    assert not (tmp_path / "other").exists()


def test_wandb_offline_mirrors_numeric_rows(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = MetricsLogger(
        tmp_path, wandb={"project": "arkd-test", "name": "unit", "mode": "offline"}, config={"seed": 3}
    )
    run = wandb.run
    assert run is not None and run.config["seed"] == 3
    logger.log({"step": 1, "loss": 2.5, "alpha_mean": 0.25, "note": "text is not sent"})
    logger.log({"step": 2, "split": "validation", "val_rougeL": 12.5})
    logger.log({"step": 3, "loss": 2.0})  # wandb commits a step's values when the next step starts
    summary = dict(run.summary)
    logger.close()
    assert wandb.run is None
    assert summary["train/loss"] == 2.5 and summary["train/alpha_mean"] == 0.25
    assert summary["validation/val_rougeL"] == 12.5 and "train/note" not in summary
    # Offline runs are written under the run directory, ready for `wandb sync`.
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.5
