"""Alpha strategies: everything that decides the weight alpha of ``alpha * FKL + (1 - alpha) * RKL``.

All of them implement ``AlphaStrategy`` (see docs/architecture.md), so the trainer calls ``select`` every step, and
``update`` with the immediate reward when ``needs_reward`` is True, without ever branching on which strategy it holds.
The equations and the reasons for each choice are in docs/policy.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from arkd import distributed as pdist
from arkd.policy.features import Features

GRANULARITIES = ("batch", "sequence", "token")


@dataclass
class StepContext:
    """What a strategy sees at one training step.

    Attributes:
        features: the step's teacher-student statistics (``compute_features`` on the step's detached logits; at
            batch granularity those of the window's first micro-batch).
        progress: fraction of training done, in [0, 1].
        step: the optimiser step index (0-based: the number of steps already taken).
        candidates: on a reward step, how many actions the trainer will score (0: not a reward step; K >= 2: paired
            counterfactual candidates; 1: the legacy same-batch reward crediting the applied action).
        lookahead: ``alpha -> reward`` of the trainer's real step previewed with another alpha, on the step's own
            window (only for strategies with ``chooses_after_gradient``; None otherwise).
    """

    features: Features
    progress: float = 0.0
    step: int = 0
    candidates: int = 0
    lookahead: Callable[[float], float | torch.Tensor] | None = None


def _check_alpha(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


class AlphaStrategy:
    """The interface every alpha strategy implements; the class attributes declare what it needs from the trainer.

    Attributes:
        needs_reward: True when the trainer must compute rewards and call ``update`` (every ``reward.interval``
            steps, asking for ``ctx.candidates`` actions).
        granularity: ``"batch"`` (alpha ``[]``, one per optimiser step), ``"sequence"`` (``[B]``) or ``"token"``
            (``[B, T]``).
        chooses_after_gradient: True when ``select`` needs ``ctx.lookahead`` (a search over previewed steps): the
            trainer then computes the window's gradient first and calls ``select`` once per optimiser step.
    """

    needs_reward: bool = False
    granularity: str = "batch"
    chooses_after_gradient: bool = False

    def __init__(self) -> None:
        self._log: dict[str, float] = {}

    @property
    def feature_options(self) -> dict:
        """Keyword arguments the trainer passes to ``compute_features`` (e.g. AKL's ``mu``)."""
        return {}

    def select(self, ctx: StepContext) -> torch.Tensor:
        """Alpha for this step, in [0, 1], on the features' device: ``[]``, ``[B]`` or ``[B, T]``."""
        raise NotImplementedError

    def candidate_actions(self) -> list[torch.Tensor]:
        """The actions of the last ``select`` that the reward must score (learning strategies; empty otherwise)."""
        return []

    def update(self, reward) -> dict[str, float]:
        """Learn from the rewards of the pending actions; strategies without a reward refuse."""
        raise RuntimeError(f"{type(self).__name__}.update: this strategy does not learn (needs_reward is False)")

    def last_log(self) -> dict[str, float]:
        """The strategy's own statistics of the last ``select`` / ``update`` (policy entropy, rewards, ...)."""
        return dict(self._log)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class ConstantAlpha(AlphaStrategy):
    """A fixed alpha: 1 is FKL, 0 is RKL, 0.5 their average.

    Args:
        alpha: the weight of FKL, in [0, 1].
    """

    def __init__(self, *, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = _check_alpha("ConstantAlpha: alpha", alpha)

    def select(self, ctx: StepContext) -> torch.Tensor:
        alpha = torch.tensor(self.alpha, device=ctx.features.device)
        return alpha


class _Schedule(AlphaStrategy):
    def __init__(self, *, start: float = 1.0, end: float = 0.0) -> None:
        super().__init__()
        name = type(self).__name__
        self.start = _check_alpha(f"{name}: start", start)
        self.end = _check_alpha(f"{name}: end", end)

    def value(self, progress: float) -> float:
        raise NotImplementedError

    def select(self, ctx: StepContext) -> torch.Tensor:
        progress = min(max(float(ctx.progress), 0.0), 1.0)
        alpha = torch.tensor(self.value(progress), device=ctx.features.device)
        return alpha


class LinearSchedule(_Schedule):
    """alpha moves linearly from ``start`` (progress 0) to ``end`` (progress 1): start + (end - start) * progress."""

    def value(self, progress: float) -> float:
        return self.start + (self.end - self.start) * progress


class CosineSchedule(_Schedule):
    """alpha follows half a cosine from ``start`` to ``end``: end + (start - end) * (1 + cos(pi * progress)) / 2."""

    def value(self, progress: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class AKLHeuristic(AlphaStrategy):
    """AKL (Wu et al. 2025) as a per-token alpha: g_head / (g_head + g_tail).

    ``bidirectional_kl`` with this alpha equals ``adaptive_kl`` with the same ``mu`` (0.5 where both gaps are 0,
    i.e. where p = q and both divergences vanish).

    Args:
        mu: head mass threshold; the trainer passes it to ``compute_features`` through ``feature_options``.
    """

    granularity = "token"

    def __init__(self, *, mu: float = 0.5) -> None:
        super().__init__()
        if not 0 < mu <= 1:
            raise ValueError(f"AKLHeuristic: mu must be in (0, 1], got {mu}")
        self.mu = float(mu)

    @property
    def feature_options(self) -> dict:
        return {"mu": self.mu}

    def select(self, ctx: StepContext) -> torch.Tensor:
        if not math.isclose(ctx.features.mu, self.mu):
            raise ValueError(
                f"AKLHeuristic(mu={self.mu}) got features computed with mu={ctx.features.mu}; compute them with "
                f"compute_features(..., **strategy.feature_options)"
            )
        alpha = ctx.features.akl_alpha()
        return alpha


class ToDiHeuristic(AlphaStrategy):
    """ToDi (arXiv 2505.16297) reduced to one alpha per token: sum_v p_v sigmoid(log p_v - log q_v).

    ToDi weights every vocabulary entry separately; a token-level alpha cannot reproduce that. This is the
    teacher-weighted mean of ToDi's weights (close to 1 where the student under-covers the teacher's mass, close to 0
    where it over-covers). The exact vocabulary-level method is the loss ``arkd.losses.token_wise_kl``.
    """

    granularity = "token"

    def select(self, ctx: StepContext) -> torch.Tensor:
        alpha = ctx.features.todi_alpha.clamp(0.0, 1.0)
        return alpha


class EntropyGated(AlphaStrategy):
    """BDKD's entropy gate as a per-token alpha: 0.75 where H(p) > H(q), 0.25 where H(q) > H(p), else 0.5.

    BDKD weights the favoured divergence 3 and the other 1 (total weight 4 on gated tokens, 2 elsewhere). As an
    alpha the weights are normalised to sum 1, so the overall scale of gated tokens (a factor 2) is dropped.
    """

    granularity = "token"

    def select(self, ctx: StepContext) -> torch.Tensor:
        f = ctx.features
        alpha = torch.full_like(f.teacher_entropy, 0.5)
        alpha = torch.where(f.teacher_entropy > f.student_entropy, 0.75, alpha)
        alpha = torch.where(f.student_entropy > f.teacher_entropy, 0.25, alpha)
        return alpha


class GreedySearch(AlphaStrategy):
    """The greedy heuristic: try every candidate alpha with a one-step look-ahead, keep the best immediate reward.

    The look-ahead is the trainer's real step previewed for each candidate (``arkd.policy.lookahead.StepPreview``:
    the window's gradient, clipping and the optimiser's update), scored as the decrease of ``D = (FKL + RKL) / 2`` on
    the window itself; it costs one extra backward and one student forward per candidate. Rewards are averaged over
    processes before the choice, so alpha is identical everywhere. Ties go to the first candidate.

    Args:
        candidates: the alphas tried, each in [0, 1].
    """

    chooses_after_gradient = True

    def __init__(self, *, candidates: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> None:
        super().__init__()
        cands = [_check_alpha("GreedySearch: every candidate", c) for c in candidates]
        if not cands:
            raise ValueError("GreedySearch: candidates must hold at least one alpha in [0, 1]")
        self.candidates = cands

    def select(self, ctx: StepContext) -> torch.Tensor:
        if ctx.lookahead is None:
            raise RuntimeError("GreedySearch.select: StepContext.lookahead is None; the trainer must provide one")
        rewards = torch.tensor([float(ctx.lookahead(a)) for a in self.candidates], dtype=torch.float64)
        rewards = pdist.all_reduce_mean(rewards)
        best = int(torch.argmax(rewards))
        alpha = torch.tensor(self.candidates[best], device=ctx.features.device)
        self._log["greedy_best_reward"] = float(rewards[best])
        self._log["greedy_reward_spread"] = float(rewards.max() - rewards.min())
        return alpha
