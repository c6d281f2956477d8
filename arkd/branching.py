"""Branches of real training steps from one in-memory snapshot: the horizon reward and the horizon probe.

A one-step reward measures what alpha does to the next step; on the trade-off testbed that points the other way from
what alpha does to the end of the run (short-horizon bias, docs/policy.md). Here alpha is judged over ``H`` real
optimiser steps instead::

    state S (step t) --snapshot--+-- alpha a_1 for H steps --> D_1 on the reward split
                                 +-- alpha a_2 for H steps --> D_2
                                 +-- ...
    rewards r_k = D(S) - D_k  ->  the policy learns at S (leave-one-out across k)
    the main line continues from the best branch (continue_from: best) or from S with the updated policy (mean)

Every branch restores the same snapshot (weights, optimiser moments, scheduler, data position, random state,
rollout and loss state), so the candidates see the same batches and the same dropout masks: their difference is
alpha's. The horizon probe branches ``alpha - delta`` and ``alpha + delta`` the same way and logs the slope
``(D_lo - D_hi) / (hi - lo)`` beside the one-step probe's.

The loop hands this room what it needs (snapshot / restore, one training step, the score on the reward split, the
features of the next batch) and it never reaches into the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from arkd.data.collate import drop_last_position, shift_labels
from arkd.policy.control import AlphaControl

__all__ = ["Branches", "next_features", "reward_score", "state_copy"]

Row = dict[str, Any]


class Branches:
    """Run the horizon reward's decided segments and the horizon probe.

    Args:
        control: the run's alpha control (its strategy learns from the horizon reward when ``control.horizon``).
        snapshot: ``() -> state`` of everything a branch restarts from (in memory).
        restore: ``state -> None``.
        train_step: ``() -> row``: one real optimiser step of the loop.
        score: ``() -> D`` per token on the reward split (all processes).
        features: ``step -> Features`` of the next batch at the current weights (the policy's state).
        max_steps: the run's length (a segment never runs past it).
        probe_horizon: steps per branch of the horizon probe (0: no horizon probe).
        probe_interval: probe every this many steps (at multiples of it, step 0 included).
        probe_delta: half-width of the probe's alpha grid.
    """

    def __init__(
        self,
        control: AlphaControl,
        *,
        snapshot: Callable[[], Any],
        restore: Callable[[Any], None],
        train_step: Callable[[], Row],
        score: Callable[[], float],
        features: Callable[[int], Any],
        max_steps: int,
        probe_horizon: int = 0,
        probe_interval: int = 0,
        probe_delta: float = 0.2,
    ) -> None:
        self.control = control
        self.snapshot, self.restore, self.train_step = snapshot, restore, train_step
        self.score, self.features, self.max_steps = score, features, max_steps
        self.probe_horizon, self.probe_interval, self.probe_delta = probe_horizon, probe_interval, probe_delta
        if probe_horizon and control.strategy is not None and control.strategy.chooses_after_gradient:
            raise ValueError(
                "probe.horizon shifts the strategy's alpha for whole branches, which a strategy that chooses after "
                "the gradient (policy=greedy) cannot do: set probe.horizon=0."
            )

    def due(self, step: int) -> bool:
        """Whether the loop runs :meth:`run` after ``step`` steps instead of one plain step."""
        return self.control.segment_due(step) or self._probe_due(step)

    def _probe_due(self, step: int) -> bool:
        return bool(self.probe_horizon and self.control.strategy is not None and step % self.probe_interval == 0)

    def run(self, step: int) -> list[Row]:
        """The horizon probe (when due: the run is where it was afterwards), then the segment (when due): the main
        line's rows, to log as the loop's steps."""
        probe_row = self._probe(step) if self._probe_due(step) else {}
        if self.control.segment_due(step):
            rows = self._segment(step)
        else:
            rows = [self.train_step()]
        rows[0].update(probe_row)
        return rows

    def _branch(self, start: Any, steps: int, *, alpha: float | None = None, shift: float | None = None):
        """From ``start``: ``steps`` real steps with alpha held (or shifted); the rows and D on the reward split."""
        self.restore(start)
        self.control.hold(alpha, shift=shift)
        try:
            rows = [self.train_step() for _ in range(steps)]
        finally:
            self.control.hold()
        return rows, self.score()

    def _segment(self, step: int) -> list[Row]:
        control, reward = self.control, self.control.reward
        steps = min(reward.horizon, self.max_steps - step)
        mean, candidates = control.begin_segment(step, self.features(step))
        start, base = self.snapshot(), self.score()
        scores, best = [], None  # best: (D, its rows, the state it ends in): one extra snapshot in flight
        for alpha in candidates:
            rows, d = self._branch(start, steps, alpha=alpha)
            scores.append(d)
            if reward.continue_from == "best" and (best is None or d < best[0]):
                best = (d, rows, self.snapshot())
        rewards = reward.rewards(base, scores)
        control.finish_segment(rewards)
        if best is not None:
            self.restore(best[2])
            rows = best[1]
        else:  # continue_from: mean: the main line from the start, the updated policy choosing each step
            self.restore(start)
            rows = [self.train_step() for _ in range(steps)]
        rows[0].update(
            reward=float(rewards.mean()),
            horizon_alphas=[float(a) for a in candidates],
            horizon_scores=[float(d) for d in scores],
            horizon_base=float(base),
            horizon_mean_alpha=mean,
        )
        return rows

    def _probe(self, step: int) -> Row:
        """``(D_lo - D_hi) / (hi - lo)`` after ``probe_horizon`` steps at the strategy's alpha shifted by -delta and
        +delta; the run continues from where it was."""
        steps = min(self.probe_horizon, self.max_steps - step)
        start = self.snapshot(with_strategy=True)
        d_lo = self._branch(start, steps, shift=-self.probe_delta)[1]
        d_hi = self._branch(start, steps, shift=self.probe_delta)[1]
        self.restore(start)
        slope = (d_lo - d_hi) / (2 * self.probe_delta)
        return {"alpha_signal_horizon": steps, "alpha_signal_horizon_slope": slope}


def reward_score(batches: list, objective: Any, control: AlphaControl, accelerator: Any) -> Callable[[], float]:
    """``() -> D = (FKL + RKL) / 2`` per token on the reward split at the current weights (each process scores its
    share of the batches; the score is reduced over all of them)."""

    def score() -> float:
        parts = []
        for batch in batches[accelerator.process_index :: accelerator.num_processes]:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            teacher = drop_last_position(objective.teacher_logits(batch))
            parts.append((batch, teacher, shift_labels(batch)[1]))
        return control.scorer(parts)()

    return score


def next_features(window: Any, objective: Any, control: AlphaControl) -> Callable[[int], Any]:
    """``step -> Features`` of the first batch of step ``step + 1`` at the current weights (the policy's state)."""

    def features(step: int) -> Any:
        batch, teacher_logits = window.peek_next(step - 1)  # peek_next(s) is the batch of step s + 2
        return objective.features(batch, teacher_logits, control.feature_options)

    return features


def state_copy(value: Any) -> Any:
    """A deep copy of a state dict's tensors (detached, cloned), containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: state_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [state_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(state_copy(v) for v in value)
    return value
