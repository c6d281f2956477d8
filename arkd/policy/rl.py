"""The reinforcement-learning arithmetic of the learned alpha policy, as pure functions.

Nothing here knows about models, trainers or processes: rewards and log-probabilities in, advantages and losses out.
``arkd.policy.learned.LearnedPolicy`` composes them; the tests check each one against a hand-written formula.

Two credit schemes (docs/policy.md, "Credit"):

- **paired** (the default): K actions are sampled from the policy at one state, each is previewed as the trainer's
  real step from the same optimiser state and scored on the same held-out batch, so every common part of the reward
  (batch difficulty, learning-rate level, the shared momentum) cancels in ``r_k - mean_{j != k} r_j``
  (:func:`leave_one_out`). One reward per candidate; a candidate is a whole action (one alpha, or the joint vector of
  a batch's per-sequence / per-token alphas).
- **self** (the legacy same-batch reward, kept for comparison): one reward per entry, centred within the update
  across all processes (``LearnedPolicy`` subtracts the pooled mean).
"""

from __future__ import annotations

import math

import torch


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO advantages ``A_k = r_k - mean_{j != k} r_j`` of the K rewards of one state (``[K]``, K >= 2).

    Each baseline excludes its own sample, so the score-function estimator stays unbiased (Kool et al. 2019,
    "Buy 4 REINFORCE samples, get a baseline for free"). ``sum_k A_k = 0``.

    Raises:
        ValueError: fewer than two rewards.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    k = rewards.numel()
    if k < 2:
        raise ValueError(f"leave_one_out: needs at least 2 rewards of one state, got {k}")
    return (rewards - (rewards.sum() - rewards) / (k - 1)).to(torch.float64)


class RunningScale:
    """A moving root-mean-square of advantages, to divide them by (the reward's scale falls with the learning rate).

    ``scale = sqrt(ema(mean(A^2)))`` with ``ema_t = m * ema_{t-1} + (1 - m) * x_t`` (the first value taken as is).

    Args:
        momentum: weight of the past, in [0, 1).
        eps: floor of the scale.
    """

    def __init__(self, momentum: float = 0.9, eps: float = 1e-12) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"RunningScale: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.value: float | None = None

    def update(self, advantages: torch.Tensor | float) -> float:
        """Pool ``mean(A^2)`` of this update (the advantages, or their mean square as a float) and return the scale."""
        if torch.is_tensor(advantages):
            x = float(advantages.double().pow(2).mean()) if advantages.numel() else 0.0
        else:
            x = float(advantages)
        self.value = x if self.value is None else self.momentum * self.value + (1 - self.momentum) * x
        return math.sqrt(self.value + self.eps)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def reinforce_loss(
    log_probs: torch.Tensor, advantages: torch.Tensor, entropy: torch.Tensor, entropy_coef: float = 0.0
) -> torch.Tensor:
    """``-mean(A * log pi(a)) - entropy_coef * mean(H)`` (``log_probs`` and ``advantages`` of one shape).

    ``advantages`` are constants (detached); ``entropy`` is the policy's entropy at the states of the update.
    """
    if log_probs.shape != advantages.shape:
        raise ValueError(
            f"reinforce_loss: log_probs {tuple(log_probs.shape)} and advantages {tuple(advantages.shape)} must match"
        )
    n = max(log_probs.numel(), 1)  # a process without entries still joins the gradient average, with 0
    bonus = entropy.sum() / max(entropy.numel(), 1) if entropy.numel() else log_probs.new_zeros(())
    return -(advantages.detach().to(log_probs.dtype) * log_probs).sum() / n - entropy_coef * bonus


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    *,
    clip: float,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017) and the share of clipped ratios.

    ``loss = -mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)) - entropy_coef * mean(H)``,
    ``rho = exp(log pi(a) - log pi_old(a))``.
    """
    ratio = torch.exp(log_probs - old_log_probs.detach())
    adv = advantages.detach().to(log_probs.dtype)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    n = max(log_probs.numel(), 1)
    bonus = entropy.sum() / max(entropy.numel(), 1) if entropy.numel() else log_probs.new_zeros(())
    clipped = ((ratio.detach() - 1).abs() > clip).to(torch.float32).sum() / n
    return -surrogate.sum() / n - entropy_coef * bonus, clipped
