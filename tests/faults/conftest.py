"""The fault-injection suite: every fault and bad input of docs/reliability.md, through the real entry points
(``arkd.cli.train.main`` / ``arkd.cli.eval.main`` / ``arkd.cli.compare.main`` in this process, and one
``arkd-train`` subprocess for signals). Every test here is marked ``faults``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from _small import SMALL

# A tiny distillation run in about a second: untrained tiny teacher and student (no SFT), a few steps, short
# validation generations, no final report.


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.faults)


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def _code(err: SystemExit) -> int:
    return 0 if err.code is None else int(err.code)


@pytest.fixture
def arkd_train(tmp_path, monkeypatch, capsys, one_torch_thread):
    """``arkd_train(*overrides, run_dir=...) -> Outcome``: arkd-train's console entry point in this process."""
    from arkd.cli.train import main

    monkeypatch.chdir(tmp_path)

    def call(*overrides: str, run_dir: Path | None = None, small: bool = True) -> Outcome:
        cache = [] if any(o.startswith("cache_dir=") for o in overrides) else [f"cache_dir={tmp_path / 'cache'}"]
        argv = [*(SMALL if small else []), *cache, *overrides]
        argv += [f"hydra.run.dir={run_dir or tmp_path / 'run'}", "hydra/job_logging=none", "hydra/hydra_logging=none"]
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["arkd-train"])
        try:
            main(argv)
            code = 0
        except SystemExit as err:
            code = _code(err)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return call
