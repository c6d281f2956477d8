"""Train / validation / test splits that never share a prompt (configs point at :func:`held_out_splits`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arkd.errors import ConfigError


def held_out_splits(
    train: Sequence[Any], validation: Sequence[Any], test: Sequence[Any] | None = None
) -> dict[str, list[Any]]:
    """Training rows without any prompt of the validation or test rows, and the held-out splits.

    Args:
        train: training examples (e.g. the raw Dolly pool).
        validation: validation examples (checkpoint selection).
        test: test examples (final evaluation only), or None.

    Returns:
        ``{"train", "validation", "test"}`` (test an empty list when None).
    """
    held = {example.prompt for example in validation} | {example.prompt for example in test or []}
    kept = [example for example in train if example.prompt not in held]
    if not kept:
        raise ConfigError("every training row also occurs in the validation or test split: expected a training pool.")
    return {"train": kept, "validation": list(validation), "test": list(test or [])}
