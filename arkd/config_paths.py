"""Where the Hydra config tree lives, for editable checkouts and plain ``pip install .`` alike."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """Return the directory holding ``train.yaml`` (arkd-train), ``evaluate.yaml`` (arkd-eval) and the config groups.

    The top-level ``configs/`` of the source tree is reached through the symlink ``arkd/configs``; an installed wheel
    carries the same tree as package data in ``arkd/configs``.
    """
    path = Path(__file__).resolve().parent / "configs"
    if not path.is_dir():
        raise FileNotFoundError(
            f"arkd's config tree was not found at {path}: expected the package data 'arkd/configs' "
            "(reinstall arkd with 'pip install .')."
        )
    return path
