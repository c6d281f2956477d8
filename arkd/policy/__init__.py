"""arkd.policy: teacher-student statistics, the alpha strategies, the learned ARKD policy and the alpha-signal probe.

Every strategy implements ``AlphaStrategy`` (``select(ctx) -> alpha``, ``update(reward)``, ``last_log()``,
``state_dict()``) and declares what it needs from the trainer in class attributes (``needs_reward``,
``granularity``, ``chooses_after_gradient``); the trainer builds one through Hydra's ``_target_`` and never branches
on its name. Rooms:

- ``strategies.py``: the interface and the small strategies (constant, schedules, AKL, ToDi, entropy-gated, greedy);
- ``learned.py``: ARKD's Beta policy network trained from immediate rewards;
- ``rl.py``: advantages and policy-gradient losses as pure functions;
- ``lookahead.py``: the one preview of the trainer's real step for another alpha (greedy, probe, paired reward);
- ``control.py``: alpha control (strategy, reward, probe and step preview) behind the calls a training loop makes;
- ``probe.py``: the alpha-signal probe (does alpha matter right now, and which way?);
- ``features.py``, ``network.py``: statistics, the MLP (the torch.distributed helpers are :mod:`arkd.distributed`).
"""

from arkd.policy.control import AlphaControl, NoControl, StepControl
from arkd.policy.features import (
    FEATURE_NAMES,
    Features,
    RunningNorm,
    compute_features,
    compute_features_from_hidden,
)
from arkd.policy.learned import LearnedPolicy
from arkd.policy.lookahead import BatchScorer, StepPreview, adam_step_preview, step_preview_for
from arkd.policy.network import PolicyNetwork
from arkd.policy.probe import AlphaSignalProbe
from arkd.policy.strategies import (
    AKLHeuristic,
    AlphaStrategy,
    ConstantAlpha,
    CosineSchedule,
    EntropyGated,
    GreedySearch,
    LinearSchedule,
    StepContext,
    ToDiHeuristic,
)

__all__ = [
    "FEATURE_NAMES",
    "AKLHeuristic",
    "AlphaControl",
    "AlphaSignalProbe",
    "AlphaStrategy",
    "BatchScorer",
    "ConstantAlpha",
    "CosineSchedule",
    "EntropyGated",
    "Features",
    "GreedySearch",
    "LearnedPolicy",
    "LinearSchedule",
    "NoControl",
    "PolicyNetwork",
    "RunningNorm",
    "StepContext",
    "StepControl",
    "StepPreview",
    "ToDiHeuristic",
    "adam_step_preview",
    "compute_features",
    "compute_features_from_hidden",
    "step_preview_for",
]
