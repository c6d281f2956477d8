"""The name of a run's alpha strategy, as the training recipe records it (``report.json["strategy"]``) and as
arkd-compare's tables show it: :func:`strategy_name` from what the run recorded, :func:`strategy_label` for runs older
than the recorded block. A room of its own so that the training recipe names its run without importing the comparison
tool (:mod:`arkd.evaluation.compare` re-exports both)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["strategy_label", "strategy_name"]


def strategy_name(
    preset: str | None,
    overrides: Sequence[str] = (),
    *,
    loss: str | None = None,
    takes_alpha: bool = True,
    label: str | None = None,
) -> str:
    """The name of a run's alpha strategy in arkd-compare's tables, from what the run recorded.

    ``label`` (``arkd-train ... label=NAME``) when set; ``loss=<loss>`` for a loss that does not take alpha (no
    strategy is built with it); otherwise the ``policy`` preset (Hydra's choice, e.g. ``fkl``, ``learned``) followed
    by the run's own ``policy.*`` overrides in brackets (``constant[alpha=0.25]``), so that two variants of one preset
    never share a name.

    Args:
        preset: the ``policy`` group choice.
        overrides: the run's command-line overrides (only ``policy.KEY=VALUE`` ones enter the name).
        loss: the ``loss`` group choice (or the loss class), named when the loss ignores alpha.
        takes_alpha: whether the run's loss takes alpha (its ``takes_alpha`` declaration).
        label: the run's ``label``.
    """
    if label:
        return str(label)
    if not takes_alpha:
        return f"loss={loss}"
    own = [o.split(".", 1)[1] for o in overrides if o.startswith("policy.") and "=" in o]
    name = str(preset or "policy")
    return f"{name}[{','.join(own)}]" if own else name


def strategy_label(config: dict[str, Any], choices: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> str:
    """The name of a run's alpha strategy for a run without a recorded ``strategy`` block (runs of arkd before the
    block existed): :func:`strategy_name` from the resolved config, Hydra's group choices and the run's overrides.

    Without Hydra's record the preset is named by the policy's class and its options (``ConstantAlpha(alpha=1.0)``).
    Whether the loss takes alpha is read from the loss class's own declaration (:func:`arkd.losses.loss_capabilities`).

    Raises:
        ValueError: the config has no ``policy`` node with a ``_target_``.
    """
    choices = choices or {}
    loss = config.get("loss") or {}
    loss_target = str(loss.get("_target_", "")) if isinstance(loss, dict) else ""
    takes_alpha = True
    if loss_target and not config.get("label"):
        takes_alpha = _loss_takes_alpha(loss_target)
    if not takes_alpha:
        return strategy_name(None, loss=choices.get("loss") or loss_target.rsplit(".", 1)[-1], takes_alpha=False)
    policy = config.get("policy")
    if not config.get("label") and (not isinstance(policy, dict) or "_target_" not in policy):
        raise ValueError("the run's config has no 'policy' node with a '_target_'; expected an arkd-train config.")
    preset = choices.get("policy")
    if not preset and isinstance(policy, dict):
        options = ", ".join(f"{k}={v}" for k, v in policy.items() if k != "_target_")
        preset = f"{str(policy['_target_']).rsplit('.', 1)[-1]}({options})"
    return strategy_name(preset, overrides, label=config.get("label"))


def _loss_takes_alpha(target: str) -> bool:
    """Whether the loss class ``target`` (a ``_target_`` path) declares ``takes_alpha``; False for a path that names
    no class (ImportError, ValueError from ``hydra.utils.get_class``) or a class that is no declared arkd loss
    (TypeError from :func:`arkd.losses.loss_capabilities`): such a run is named by its loss, not as a strategy. Any
    other error propagates."""
    from hydra.utils import get_class

    from arkd.losses import loss_capabilities

    try:
        return loss_capabilities(get_class(target)).takes_alpha
    except (ImportError, ValueError, TypeError):
        return False
