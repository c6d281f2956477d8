"""arkd.policy: teacher-student statistics, the policy network and the alpha strategies.

Every strategy implements ``AlphaStrategy`` (``select(ctx) -> alpha``, ``update(reward)``, ``last_log()``,
``state_dict()``); the trainer builds one through Hydra's ``_target_`` and never branches on its name.
"""

from arkd.policy.features import FEATURE_NAMES, Features, RunningNorm, compute_features
from arkd.policy.network import PolicyNetwork
from arkd.policy.strategies import (
    AKLHeuristic,
    AlphaStrategy,
    ConstantAlpha,
    CosineSchedule,
    EntropyGated,
    GreedySearch,
    LearnedPolicy,
    LinearSchedule,
    StepContext,
    ToDiHeuristic,
)

__all__ = [
    "FEATURE_NAMES",
    "AKLHeuristic",
    "AlphaStrategy",
    "ConstantAlpha",
    "CosineSchedule",
    "EntropyGated",
    "Features",
    "GreedySearch",
    "LearnedPolicy",
    "LinearSchedule",
    "PolicyNetwork",
    "RunningNorm",
    "StepContext",
    "ToDiHeuristic",
    "compute_features",
]
