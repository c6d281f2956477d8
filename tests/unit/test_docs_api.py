"""docs/api.md: its training-loop example runs, and it lists every public name of the modules it documents."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "docs" / "api.md"
MODULES = ["arkd.losses", "arkd.policy", "arkd.data", "arkd.evaluation", "arkd.evaluation.stats"]
MODULES += ["arkd.evaluation.compare", "arkd.teacher_cache"]


def test_training_loop_example_runs_and_learns(capsys):
    text = API.read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(block, str(API), "exec"), namespace)  # noqa: S102 - the documented example, verbatim
    strategy = namespace["strategy"]
    log = strategy.last_log()
    assert log["policy_updated"] == 1.0 and 0.0 < log["policy_mean"] < 1.0
    row = namespace["row"]  # the last step: a paired reward (every step) and a probe (every second step)
    assert set(row) >= {"reward", "alpha_signal_slope", "alpha_signal_t", "alpha_signal_best"}
    assert all(isinstance(row[key], float) for key in ("reward", "alpha_signal_slope"))
    assert "policy_mean" in capsys.readouterr().out


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_is_listed(module):
    text = API.read_text()
    assert f"## `{module}`" in text
    section = text.split(f"## `{module}`", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in importlib.import_module(module).__all__ if f"| `{name}` |" not in section]
    assert not missing, f"docs/api.md, section {module}: missing {missing}"
