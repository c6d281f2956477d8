"""The one sentence for an override of a key the config does not have (``trainer.bogus=1``, ``decoding.bogus=3``),
shared by the commands: the valid keys at that place, as the ``+key`` case lists them, instead of Hydra's
"Could not override" and a stack trace."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_NOT_FOUND = re.compile(r"Could not override '([^']+)'")


def unknown_key_sentence(err: BaseException, overrides: list[str], compose: Callable[[list[str]], Any]) -> str | None:
    """``KEY: no such key; expected one of the keys in PARENT: a, b, c (...)`` when ``err`` is Hydra's refusal of an
    override of a missing key, else None.

    Args:
        err: the error composing ``overrides`` raised.
        overrides: the command's overrides.
        compose: composes a list of overrides into the config (the command's own tree).
    """
    from omegaconf import DictConfig, OmegaConf

    match = _NOT_FOUND.search(str(err))
    if match is None:
        return None
    key = match.group(1)
    rest = [o for o in overrides if o.lstrip("~+").split("=", 1)[0] != key]
    try:
        reference = compose(rest)
    except Exception:  # noqa: BLE001 - another problem: Hydra's own message says it
        return None
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node = OmegaConf.select(reference, parent) if parent else reference
    if not isinstance(node, DictConfig):
        return None
    where = f"in {parent}" if parent else "at the top level"
    keys = ", ".join(sorted(str(k) for k in node.keys()))
    return f"{key}: no such key; expected one of the keys {where}: {keys}."
