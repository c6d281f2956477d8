"""Where the Hydra config tree lives, for editable checkouts and plain ``pip install .`` alike."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def config_dir() -> Path:
    """Return the directory holding ``train.yaml`` (arkd-train), ``evaluate.yaml`` (arkd-eval) and the config groups.

    An installed wheel ships the top-level ``configs/`` as the package ``arkd.configs``; an editable or source
    checkout has it beside the ``arkd`` package.
    """
    try:
        packaged = Path(str(resources.files("arkd.configs")))
        if (packaged / "train.yaml").is_file() or (packaged / "evaluate.yaml").is_file():
            return packaged
    except (ModuleNotFoundError, TypeError):
        pass
    source = Path(__file__).resolve().parent.parent / "configs"
    if source.is_dir():
        return source
    raise FileNotFoundError(
        "arkd's config tree was not found: expected the package data 'arkd/configs' or a 'configs/' folder beside "
        "the 'arkd' package; reinstall arkd with 'pip install .'."
    )
