"""The training run's log: ``metrics.jsonl`` always, Weights & Biases when configured, and its one reader.

(:mod:`arkd.evaluation.metrics` holds the evaluation scores; this module only logs and reads training rows.)

Only the main process writes; other processes get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of ``value`` (tensors to numbers, NaN / inf to null)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricsLogger:
    """Append one JSON object per call to ``metrics.jsonl``; mirror to wandb when ``wandb`` options are given.

    Args:
        run_dir: the run directory (``metrics.jsonl`` is created there).
        enabled: False on non-main processes: nothing is written.
        wandb: None, or keyword arguments for ``wandb.init`` (``project``, ``name``, ``mode`` ("offline" works
            without a network), ``dir``, ...).
        config: the resolved config, recorded by wandb.
        resume: True when continuing a run: rows of steps after ``resume_step`` are dropped from the file first,
            so that a resumed run's file has each step once.
        resume_step: the step the run continues from.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        wandb: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        resume: bool = False,
        resume_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif not resume:
            self.path.write_text("")
        if wandb:
            import wandb as wandb_lib

            options = dict(wandb)
            options.setdefault("dir", str(run_dir))
            os.makedirs(options["dir"], exist_ok=True)
            self._wandb_run = wandb_lib.init(config=config, **options)

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (a dict with at least ``step``)."""
        if not self.enabled:
            return
        row = _plain(row)
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        except OSError as err:  # a full or read-only disk: name the file; the rows already written stay
            from arkd.errors import OutputError, describe_os_error

            raise OutputError(
                f"cannot append to {self.path}: {describe_os_error(err)}; the rows already written are kept."
            ) from None
        if self._wandb_run is not None:
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            prefix = "validation/" if row.get("split") == "validation" else "train/"
            self._wandb_run.log({prefix + k: v for k, v in numbers.items()}, step=int(row["step"]))

    def close(self) -> None:
        """Finish the wandb run, if any."""
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a run's ``metrics.jsonl`` (one JSON object per line; blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object (names the file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file; expected a run's metrics.jsonl.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a {type(row).__name__}; expected a JSON object.")
        rows.append(row)
    return rows
