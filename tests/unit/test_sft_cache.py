"""The SFT cache's publication step: a run publishes its model by renaming its own work directory; a concurrent run
of the same SFT that finished first keeps its copy; an incomplete cached directory is replaced."""

from __future__ import annotations

from arkd.recipes.sft_cache import _publish


def _work(root, name, weights):
    work = root / name
    (work / "final").mkdir(parents=True)
    (work / "final" / "model.safetensors").write_text(weights)
    (work / "metrics.jsonl").write_text('{"step": 1}\n')
    return work


def test_publish_moves_the_model_and_its_sft_metrics(tmp_path):
    work, path = _work(tmp_path, ".tmp-a", "ours"), tmp_path / "student-sft-k"
    _publish(work, path)
    assert (path / "model.safetensors").read_text() == "ours"
    assert (path / "sft_metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not work.exists()


def test_a_model_published_meanwhile_by_another_run_is_kept(tmp_path):
    path = tmp_path / "student-sft-k"
    _publish(_work(tmp_path, ".tmp-first", "first"), path)
    second = _work(tmp_path, ".tmp-second", "second")
    _publish(second, path)  # no error, and the first run's model stays
    assert (path / "model.safetensors").read_text() == "first"
    assert not second.exists()


def test_an_incomplete_cached_directory_is_replaced(tmp_path):
    path = tmp_path / "student-sft-k"
    path.mkdir()
    (path / "config.json").write_text("{}")  # weights never written (a run killed while saving)
    _publish(_work(tmp_path, ".tmp-a", "ours"), path)
    assert (path / "model.safetensors").read_text() == "ours"
    assert not (path / "config.json").exists()
