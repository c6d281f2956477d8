"""docs/integrations.md: its two examples run (KDTrainer with the learned policy, ARKDGKDTrainer switched from a GKD
script with the ChatML collator and on-policy sampling) and are the files in examples/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"
EXAMPLES = {"KDTrainer": ROOT / "examples" / "kd_trainer.py", "ARKDGKDTrainer": ROOT / "examples" / "gkd_trainer.py"}


def _blocks() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    return dict(zip(EXAMPLES, blocks))


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_examples_are_the_documented_code(name):
    assert _blocks()[name] in EXAMPLES[name].read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_documented_example_runs(name, tmp_path, monkeypatch, capsys):
    if name == "ARKDGKDTrainer":
        pytest.importorskip("trl.experimental.gkd")
        monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    monkeypatch.chdir(tmp_path)  # the examples write runs/ under the working directory
    namespace: dict = {}
    exec(compile(_blocks()[name], str(DOC), "exec"), namespace)  # noqa: S102 - the documented example, verbatim
    trainer = namespace["trainer"]
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert rows and all(0 <= row["alpha"] <= 1 and row["fkl"] > 0 for row in rows)
    assert any("reward" in row for row in rows)  # the learned policy's paired reward ran
    if name == "KDTrainer":
        assert any("alpha_signal_slope" in row for row in rows)
        assert (tmp_path / "runs" / "kd_example" / "checkpoint-8" / "arkd_alpha_state.pt").is_file()
    assert "'alpha'" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["arkd.integrations.transformers", "arkd.integrations.trl"])
def test_api_md_lists_every_public_name(module):
    """docs/api.md documents the integrations (tests/unit/test_docs_api.py's check; TRL's module needs TRL)."""
    if module.endswith(".trl"):
        pytest.importorskip("trl.experimental.gkd")
    import importlib

    text = (ROOT / "docs" / "api.md").read_text()
    assert f"## `{module}`" in text
    section = text.split(f"## `{module}`", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in importlib.import_module(module).__all__ if f"| `{name}` |" not in section]
    assert not missing, f"docs/api.md, section {module}: missing {missing}"
