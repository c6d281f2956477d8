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

from arkd.policy import distributed as pdist
from arkd.policy.features import FEATURE_NAMES, Features, RunningNorm
from arkd.policy.network import PolicyNetwork

GRANULARITIES = ("batch", "sequence", "token")


@dataclass
class StepContext:
    """What a strategy sees at one training step.

    Attributes:
        features: the step's teacher-student statistics (``compute_features`` on the step's detached logits).
        progress: fraction of training done, in [0, 1].
        step: the optimiser step index.
        lookahead: ``alpha -> reward`` of a one-step look-ahead from the current parameters on the current batch
            (provided by the trainer for searching strategies such as ``GreedySearch``; None where unavailable).
    """

    features: Features
    progress: float = 0.0
    step: int = 0
    lookahead: Callable[[float], float | torch.Tensor] | None = None


def _check_alpha(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


class AlphaStrategy:
    """The interface every alpha strategy implements.

    Attributes:
        needs_reward: True when the trainer must compute the immediate reward and call ``update``.
        granularity: ``"batch"`` (alpha ``[]``), ``"sequence"`` (``[B]``) or ``"token"`` (``[B, T]``).
    """

    needs_reward: bool = False
    granularity: str = "batch"

    def __init__(self) -> None:
        self._log: dict[str, float] = {}

    @property
    def feature_options(self) -> dict:
        """Keyword arguments the trainer should pass to ``compute_features`` (e.g. AKL's ``mu``)."""
        return {}

    def select(self, ctx: StepContext) -> torch.Tensor:
        """Alpha for this step, in [0, 1], on the features' device: ``[]``, ``[B]`` or ``[B, T]``."""
        raise NotImplementedError

    def update(self, reward: torch.Tensor) -> dict[str, float]:
        """Learn from the reward of the action of the last ``select``; strategies without a reward refuse."""
        raise RuntimeError(f"{type(self).__name__}.update: this strategy does not learn (needs_reward is False)")

    def last_log(self) -> dict[str, float]:
        """What the last ``select`` (and ``update``) did: alpha_mean, alpha_std, fkl, rkl, and strategy extras."""
        return dict(self._log)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def _log_select(self, ctx: StepContext, alpha: torch.Tensor) -> None:
        """Record alpha's mean/std over the counted entries and the batch FKL/RKL (a collective, see Features)."""
        f = ctx.features
        if alpha.dim() == 0:
            values = alpha.reshape(1)
        elif alpha.dim() == 1:
            values = alpha[f.mask.any(dim=1)]
        else:
            values = alpha[f.mask]
        values = values.detach().float()
        self._log = {
            "alpha_mean": float(values.mean()) if values.numel() else float("nan"),
            "alpha_std": float(values.std(unbiased=False)) if values.numel() else float("nan"),
            "fkl": f.fkl_mean,
            "rkl": f.rkl_mean,
        }


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
        self._log_select(ctx, alpha)
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
        self._log_select(ctx, alpha)
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
        self._log_select(ctx, alpha)
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
        self._log_select(ctx, alpha)
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
        self._log_select(ctx, alpha)
        return alpha


class GreedySearch(AlphaStrategy):
    """The greedy heuristic: try every candidate alpha with a one-step look-ahead, keep the best immediate reward.

    Costs one look-ahead per candidate per step (see ``arkd.reward.linear_lookahead`` for a cheap one). Rewards are
    averaged over processes before the choice, so alpha is identical everywhere. Ties go to the first candidate.

    Args:
        candidates: the alphas tried, each in [0, 1].
    """

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
        self._log_select(ctx, alpha)
        self._log["greedy_best_reward"] = float(rewards[best])
        self._log["greedy_reward_spread"] = float(rewards.max() - rewards.min())
        return alpha


@dataclass
class _Pending:
    """The action of the last ``select``, waiting for its reward."""

    inputs: torch.Tensor  # [n, in_features], CPU float32
    actions: torch.Tensor  # [n]
    log_probs: torch.Tensor  # [n] under the policy that sampled them
    valid: torch.Tensor | None  # where the n actions sit: None (batch), [B] (sequence) or [B, T] (token) bool


class LearnedPolicy(AlphaStrategy):
    """ARKD: a Beta policy over alpha, trained by REINFORCE (or PPO) from immediate rewards.

    State: the normalised ``FEATURE_NAMES`` statistics (FKL and RKL through log1p first) at the chosen granularity,
    plus three context inputs: ``2 * progress - 1``, the recent reward (a moving average of the mean advantage)
    and the loss trend ``log D_t - log EMA(D)`` with ``D = (FKL + RKL) / 2``. Action: alpha ~ Beta (its mean when
    ``deterministic``). Update (per reward, or per ``buffer_size`` rewards with PPO):
    ``A = (r - b) / s``, ``loss = -mean(A * log pi(a | x)) - entropy_coef * mean(H(pi(. | x)))``,
    with ``b`` a moving average of the reward and ``s^2`` one of ``(r - b)^2``.

    The network, its optimiser, the running statistics, the baseline, the sampling RNG and the PPO buffer are all
    in ``state_dict``. Under torch.distributed the statistics are reduced across processes, batch-level alpha is
    broadcast from rank 0, gradients are averaged and parameters are broadcast at construction, so the policy stays
    identical on every process.

    Args:
        granularity: ``"batch"``, ``"sequence"`` or ``"token"``: one alpha per batch, per sequence or per token.
        hidden_size: width of the MLP's hidden layers.
        num_layers: number of hidden layers.
        lr: Adam learning rate of the policy.
        entropy_coef: weight of the entropy bonus.
        baseline_momentum: momentum of the reward baseline and of the reward scale, in [0, 1).
        normalize_reward: divide the advantage by the running reward scale.
        ppo_clip: None for plain REINFORCE; a float epsilon for PPO's clipped objective over a buffer.
        ppo_epochs: optimiser steps per buffer with PPO.
        buffer_size: rewards collected before a PPO update.
        init_alpha: alpha's initial mean.
        init_concentration: the Beta's initial concentration (a + b).
        feature_momentum: momentum of the feature normaliser.
        max_grad_norm: gradient-norm clip of each policy step (None: no clip).
        deterministic: play the mean instead of sampling (and record nothing to learn from).
        seed: seeds the network's initialisation and the sampling RNG.
    """

    needs_reward = True
    _EPS = 1e-4  # alpha is kept in [eps, 1 - eps] so that log-probabilities stay finite

    def __init__(
        self,
        *,
        granularity: str = "batch",
        hidden_size: int = 64,
        num_layers: int = 2,
        lr: float = 1e-3,
        entropy_coef: float = 1e-3,
        baseline_momentum: float = 0.9,
        normalize_reward: bool = True,
        ppo_clip: float | None = None,
        ppo_epochs: int = 4,
        buffer_size: int = 8,
        init_alpha: float = 0.5,
        init_concentration: float = 4.0,
        feature_momentum: float = 0.99,
        max_grad_norm: float | None = 1.0,
        deterministic: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"LearnedPolicy: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if not 0 <= baseline_momentum < 1:
            raise ValueError(f"LearnedPolicy: baseline_momentum must be in [0, 1), got {baseline_momentum}")
        if ppo_clip is not None and ppo_clip <= 0:
            raise ValueError(f"LearnedPolicy: ppo_clip must be None or > 0, got {ppo_clip}")
        if ppo_epochs < 1 or buffer_size < 1:
            raise ValueError(f"LearnedPolicy: ppo_epochs and buffer_size must be >= 1, got {ppo_epochs}, {buffer_size}")
        self.granularity = granularity
        self.entropy_coef = float(entropy_coef)
        self.baseline_momentum = float(baseline_momentum)
        self.normalize_reward = bool(normalize_reward)
        self.ppo_clip = None if ppo_clip is None else float(ppo_clip)
        self.ppo_epochs = int(ppo_epochs)
        self.buffer_size = int(buffer_size)
        self.max_grad_norm = max_grad_norm
        self.deterministic = bool(deterministic)
        self.in_features = len(FEATURE_NAMES) + 3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = PolicyNetwork(
                self.in_features,
                hidden_size=hidden_size,
                num_layers=num_layers,
                init_alpha=init_alpha,
                init_concentration=init_concentration,
            )
            self._rng_state = torch.get_rng_state()
        pdist.broadcast_parameters(self.network)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=lr)
        self.norm = RunningNorm(len(FEATURE_NAMES), momentum=feature_momentum)
        self._baseline: float | None = None
        self._reward_scale: float | None = None
        self._d_ema: float | None = None
        self._recent_advantage = 0.0
        self._num_updates = 0
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending: _Pending | None = None

    # ------------------------------------------------------------------ state
    def _context(self, progress: float, d: float) -> torch.Tensor:
        """``[3]``: centred progress, recent reward, loss trend (updates the loss EMA when training)."""
        progress = min(max(float(progress), 0.0), 1.0)
        recent = self._recent_advantage
        trend = 0.0
        if self._d_ema is not None and math.isfinite(d):
            trend = math.log(d + 1e-8) - math.log(self._d_ema + 1e-8)
        if not self.deterministic and math.isfinite(d):
            self._d_ema = d if self._d_ema is None else 0.9 * self._d_ema + 0.1 * d
        values = torch.tensor([2.0 * progress - 1.0, recent, trend], dtype=torch.float32)
        return values.clamp(-5.0, 5.0)

    @staticmethod
    def _transform(raw: torch.Tensor) -> torch.Tensor:
        """log1p on the (heavy-tailed, non-negative) FKL and RKL columns."""
        raw = raw.to("cpu", torch.float32).clone()
        raw[:, :2] = torch.log1p(raw[:, :2].clamp_min(0))
        return raw

    def _state_rows(self, f: Features) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw feature rows ``[n, F]`` at this granularity and where they sit (None, ``[B]`` or ``[B, T]``)."""
        if self.granularity == "batch":
            return f.batch().reshape(1, -1), None
        if self.granularity == "sequence":
            values, counts = f.sequence()
            valid = counts > 0
            return values[valid], valid
        return f.token()[f.mask], f.mask

    # ------------------------------------------------------------------ act
    def select(self, ctx: StepContext) -> torch.Tensor:
        f = ctx.features
        batch = f.batch()  # every process takes part in the reduction, whatever the granularity
        d = float(0.5 * (batch[0] + batch[1]))
        context = self._context(ctx.progress, d)
        raw, valid = self._state_rows(f)
        raw = self._transform(raw)
        if not self.deterministic:
            self.norm.update(raw)
        x = torch.cat([self.norm(raw), context.expand(raw.shape[0], -1)], dim=-1)
        with torch.no_grad():
            dist = self.network(x)
            if self.deterministic:
                actions = dist.mean
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(self._rng_state)
                    actions = dist.sample()
                    self._rng_state = torch.get_rng_state()
            actions = actions.clamp(self._EPS, 1 - self._EPS)
            if valid is None:
                actions = pdist.broadcast(actions, src=0)
            log_probs = dist.log_prob(actions)
            entropy = dist.entropy()
        # A second select() without update() drops the earlier action: it is never credited with a later reward.
        self._pending = None if self.deterministic else _Pending(x, actions, log_probs, valid)
        alpha = self._place(actions, valid, f).to(f.device)
        self._log_select(ctx, alpha)
        self._log["policy_entropy"] = float(entropy.mean()) if entropy.numel() else float("nan")
        self._log["policy_concentration"] = (
            float((dist.concentration1 + dist.concentration0).mean()) if entropy.numel() else float("nan")
        )
        return alpha

    @staticmethod
    def _place(actions: torch.Tensor, valid: torch.Tensor | None, f: Features) -> torch.Tensor:
        """Actions back in alpha's shape; positions without a counted token get 0.5 (they weigh nothing)."""
        if valid is None:
            return actions.reshape(())
        alpha = torch.full(valid.shape, 0.5, dtype=torch.float32)
        alpha[valid.cpu()] = actions
        return alpha

    # ------------------------------------------------------------------ learn
    def _rewards_for(self, reward: torch.Tensor | float, pending: _Pending) -> torch.Tensor:
        """The reward of every pending action, ``[n]`` float64 on the CPU (each action with its own reward)."""
        reward = torch.as_tensor(reward).detach().to("cpu", torch.float64)
        if pending.valid is None:
            if reward.numel() != 1:
                raise ValueError(
                    f"LearnedPolicy.update: granularity 'batch' needs a scalar reward, got shape {tuple(reward.shape)}"
                )
            r = pdist.all_reduce_mean(reward.reshape(1))
        else:
            valid = pending.valid.cpu()
            if reward.shape == valid.shape:
                r = reward[valid]
            elif reward.shape == (pending.actions.numel(),):
                r = reward
            else:
                raise ValueError(
                    f"LearnedPolicy.update: granularity {self.granularity!r} needs a reward of shape "
                    f"{tuple(valid.shape)} (the last alpha's shape) or {(pending.actions.numel(),)} (its counted "
                    f"entries), got {tuple(reward.shape)}"
                )
        if not torch.isfinite(r).all():
            raise ValueError("LearnedPolicy.update: the reward holds NaN or inf on counted entries")
        return r

    def _advantages(self, r: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Advantages ``[n]`` from rewards ``[n]`` (statistics pooled over processes) and the global mean reward."""
        sums = pdist.all_reduce_sum(torch.stack([r.sum(), (r * r).sum(), r.new_tensor(float(r.numel()))]))
        s1, s2, n = (float(v) for v in sums)
        mean = s1 / max(n, 1.0)
        # The baseline comes from earlier rewards only (the current batch's mean on the very first update).
        b = mean if self._baseline is None else self._baseline
        dev2 = max(s2 - 2 * b * s1 + n * b * b, 0.0) / max(n, 1.0)
        m = self.baseline_momentum
        self._reward_scale = dev2 if self._reward_scale is None else m * self._reward_scale + (1 - m) * dev2
        self._baseline = mean if self._baseline is None else m * self._baseline + (1 - m) * mean
        scale = math.sqrt(self._reward_scale + 1e-12) if self.normalize_reward else 1.0
        adv = (r - b) / scale
        # The "recent reward" input: a moving average of the mean advantage (how the last rewards compared with the
        # baseline), identical on every process because it is built from pooled statistics.
        self._recent_advantage = 0.9 * self._recent_advantage + 0.1 * (mean - b) / scale
        return adv.float(), mean

    def update(self, reward: torch.Tensor | float) -> dict[str, float]:
        """Credit the action of the last ``select`` with ``reward`` and improve the policy.

        Args:
            reward: the immediate reward of that action: a scalar (batch), ``[B]`` (sequence), ``[B, T]`` or the
                ``[n]`` counted entries (token). Entries where no token was counted are ignored.

        Returns:
            The update's statistics (also merged into ``last_log``): reward, advantage_std, policy_loss, ...
        """
        pending = self._pending
        if pending is None:
            raise RuntimeError(
                "LearnedPolicy.update: no pending action; call select() (with deterministic=False) before update()"
            )
        self._pending = None
        r = self._rewards_for(reward, pending)
        adv, mean_reward = self._advantages(r)
        stats: dict[str, float] = {
            "reward": mean_reward,
            "reward_baseline": float(self._baseline),
            "advantage_std": float(adv.std(unbiased=False)) if adv.numel() > 1 else 0.0,
            "policy_updated": 0.0,
        }
        if self.ppo_clip is None:
            stats.update(self._reinforce_step(pending.inputs, pending.actions, adv))
        else:
            self._buffer.append((pending.inputs, pending.actions, pending.log_probs, adv))
            if len(self._buffer) >= self.buffer_size:
                stats.update(self._ppo_update())
        self._num_updates += 1
        self._log.update(stats)
        return stats

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        pdist.average_gradients(self.network.parameters())
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.max_grad_norm)
        self.optimizer.step()

    def _reinforce_step(self, x: torch.Tensor, actions: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
        dist = self.network(x)
        n = max(actions.numel(), 1)  # a process without counted entries still joins the gradient average, with 0
        loss = -(adv * dist.log_prob(actions)).sum() / n - self.entropy_coef * dist.entropy().sum() / n
        self._step(loss)
        return {"policy_loss": float(loss.detach()), "policy_updated": 1.0}

    def _ppo_update(self) -> dict[str, float]:
        x, actions, old_log_probs, adv = (torch.cat(parts) for parts in zip(*self._buffer))
        self._buffer.clear()
        eps = self.ppo_clip
        n = max(actions.numel(), 1)
        for _ in range(self.ppo_epochs):
            dist = self.network(x)
            ratio = torch.exp(dist.log_prob(actions) - old_log_probs)
            surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
            loss = -surrogate.sum() / n - self.entropy_coef * dist.entropy().sum() / n
            self._step(loss)
        clipped = ((ratio.detach() - 1).abs() > eps).float().sum() / n
        return {"policy_loss": float(loss.detach()), "policy_updated": 1.0, "ppo_clip_fraction": float(clipped)}

    # ------------------------------------------------------------------ inspect
    @torch.no_grad()
    def mean_alpha(self, x: torch.Tensor) -> torch.Tensor:
        """The policy's mean alpha for ready-made network inputs ``[..., in_features]`` (for analysis and tests)."""
        return self.network.mean_concentration(x)[0]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "granularity": self.granularity,
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "norm": self.norm.state_dict(),
            "baseline": self._baseline,
            "reward_scale": self._reward_scale,
            "d_ema": self._d_ema,
            "recent_advantage": self._recent_advantage,
            "num_updates": self._num_updates,
            "rng_state": self._rng_state.clone(),
            "buffer": [tuple(t.clone() for t in entry) for entry in self._buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("granularity") != self.granularity:
            raise ValueError(
                f"LearnedPolicy.load_state_dict: checkpoint granularity {state.get('granularity')!r} does not match "
                f"this policy's {self.granularity!r}"
            )
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.norm.load_state_dict(state["norm"])
        self._baseline = state["baseline"]
        self._reward_scale = state["reward_scale"]
        self._d_ema = state["d_ema"]
        self._recent_advantage = float(state["recent_advantage"])
        self._num_updates = int(state["num_updates"])
        self._rng_state = state["rng_state"].clone()
        self._buffer = [tuple(t.clone() for t in entry) for entry in state["buffer"]]
        self._pending = None
