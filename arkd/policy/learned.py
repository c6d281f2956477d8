"""ARKD's learned alpha: a Beta policy over alpha, trained by REINFORCE (or PPO) from immediate rewards.

The state, action, reward and credit are described with their equations in docs/policy.md; in short:

- **state**: the normalised teacher-student statistics (``FEATURE_NAMES``; FKL and RKL through ``log1p``) of the
  step's first micro-batch (batch granularity) or of each sequence / token, plus three context inputs: centred
  training progress, the recent reward level and the loss trend ``log D - log EMA(D)``;
- **action**: ``alpha ~ Beta(a(x), b(x))`` (:class:`arkd.policy.network.PolicyNetwork`). The trainer applies the
  policy's mean (``apply="mean"``, the default: exploration happens only in the counterfactual candidates) or a
  sample (``apply="sample"``). One alpha per optimiser step at batch granularity, shared by every micro-batch;
- **reward and credit**: on reward steps the trainer asks for ``K = ctx.candidates`` actions. With K >= 2 they are
  independent samples from the policy at the same state, each previewed as the trainer's real step and scored on
  the next batch (``arkd.reward.PairedReward``); ``update`` receives one reward per candidate and credits each whole
  candidate with its leave-one-out advantage. With K = 1 (``reward=same_batch``, the legacy reward) the applied
  action is a sample and every entry gets its own same-batch improvement, centred within the update.
- **update**: advantages divided by a running RMS, ``loss = -mean(A log pi(a | x)) - entropy_coef * mean(H)``, one
  Adam step (or PPO-clip epochs over a buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from arkd import distributed as pdist
from arkd.policy import rl
from arkd.policy.features import FEATURE_NAMES, Features, RunningNorm
from arkd.policy.network import PolicyNetwork
from arkd.policy.strategies import GRANULARITIES, AlphaStrategy, StepContext

APPLY_MODES = ("mean", "sample")


@dataclass
class _Pending:
    """The actions of one ``select`` (one micro-batch), waiting for their rewards."""

    inputs: torch.Tensor  # [n, in_features], CPU float32: the states
    candidates: torch.Tensor  # [K, n]: the sampled actions to credit
    log_probs: torch.Tensor  # [K, n] under the policy that sampled them
    valid: torch.Tensor | None  # where the n entries sit: None (batch), [B] (sequence) or [B, T] (token) bool


class LearnedPolicy(AlphaStrategy):
    """ARKD: a Beta policy network over alpha, trained from immediate rewards (see the module docstring).

    The network, its optimiser, the running statistics, the sampling RNG and the PPO buffer are all in
    ``state_dict``. Under torch.distributed the statistics are reduced across processes, batch-level actions are
    broadcast from rank 0, gradients are averaged and parameters are broadcast at construction, so the policy stays
    identical on every process.

    Args:
        granularity: ``"batch"``, ``"sequence"`` or ``"token"``: one alpha per optimiser step, sequence or token.
        apply: ``"mean"`` (play the policy's mean; explore only in the candidates) or ``"sample"``.
        hidden_size: width of the MLP's hidden layers.
        num_layers: number of hidden layers.
        lr: Adam learning rate of the policy (0: a frozen policy, the A/A control).
        entropy_coef: weight of the entropy bonus.
        scale_momentum: momentum of the running RMS the advantages are divided by, in [0, 1).
        normalize_reward: divide advantages by that running RMS.
        ppo_clip: None for plain REINFORCE; a float epsilon for PPO's clipped objective over a buffer.
        ppo_epochs: optimiser steps per buffer with PPO.
        buffer_size: updates collected before a PPO step.
        init_alpha: alpha's initial mean.
        init_concentration: the Beta's initial concentration (a + b).
        feature_momentum: momentum of the feature normaliser.
        max_grad_norm: gradient-norm clip of each policy step (None: no clip).
        seed: seeds the network's initialisation and the sampling RNG.
        init_from: start from the policy another run learned (:meth:`adopt`): its run directory (the newest verified
            checkpoint's policy), a checkpoint directory or a ``state.pt``; None: a fresh policy.
    """

    needs_reward = True
    _EPS = 1e-4  # alpha is kept in [eps, 1 - eps] so that log-probabilities stay finite

    def __init__(
        self,
        *,
        granularity: str = "batch",
        apply: str = "mean",
        hidden_size: int = 64,
        num_layers: int = 2,
        lr: float = 1e-2,
        entropy_coef: float = 1e-3,
        scale_momentum: float = 0.9,
        normalize_reward: bool = True,
        ppo_clip: float | None = None,
        ppo_epochs: int = 4,
        buffer_size: int = 8,
        init_alpha: float = 0.5,
        init_concentration: float = 4.0,
        feature_momentum: float = 0.99,
        max_grad_norm: float | None = 1.0,
        seed: int = 0,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"LearnedPolicy: granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if apply not in APPLY_MODES:
            raise ValueError(f"LearnedPolicy: apply must be one of {APPLY_MODES}, got {apply!r}")
        if lr < 0:
            raise ValueError(f"LearnedPolicy: lr must be >= 0 (0 freezes the policy), got {lr}")
        if ppo_clip is not None and ppo_clip <= 0:
            raise ValueError(f"LearnedPolicy: ppo_clip must be None or > 0, got {ppo_clip}")
        if ppo_epochs < 1 or buffer_size < 1:
            raise ValueError(f"LearnedPolicy: ppo_epochs and buffer_size must be >= 1, got {ppo_epochs}, {buffer_size}")
        self.granularity = granularity
        self.apply = apply
        self.lr = float(lr)
        self.entropy_coef = float(entropy_coef)
        self.normalize_reward = bool(normalize_reward)
        self.ppo_clip = None if ppo_clip is None else float(ppo_clip)
        self.ppo_epochs = int(ppo_epochs)
        self.buffer_size = int(buffer_size)
        self.max_grad_norm = max_grad_norm
        self.in_features = len(FEATURE_NAMES) + 3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # The on_policy input gets zero-initialised weights of its own: the other weights are drawn as before that
            # feature existed, and a run without generated batches (on_policy 0 everywhere, so those weights keep a
            # zero gradient) computes exactly what it computed then (docs/policy.md).
            self.network = PolicyNetwork(
                self.in_features,
                hidden_size=hidden_size,
                num_layers=num_layers,
                init_alpha=init_alpha,
                init_concentration=init_concentration,
                zero_inputs=(ON_POLICY_COLUMN,),
            )
            self._rng_state = torch.get_rng_state()
        pdist.broadcast_parameters(self.network)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.lr)
        self.norm = RunningNorm(len(FEATURE_NAMES), momentum=feature_momentum)
        self.scale = rl.RunningScale(scale_momentum)
        self._d_ema: float | None = None
        self._baseline: float | None = None  # self-credit with one entry per update only
        self._recent_reward = 0.0
        self._num_updates = 0
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending: list[_Pending] = []
        self._pending_step: int | None = None
        self._candidates: list[torch.Tensor] = []
        self.init_from = None if init_from is None else str(init_from)
        if self.init_from is not None:
            self.adopt(carried_policy_state(self.init_from))

    def adopt(self, state: dict) -> None:
        """Continue from a policy another run learned (``state``: its ``state_dict``): its network, Adam moments,
        feature normaliser, advantage scale, baselines and update count carry over; this run keeps its own sampling
        seed, its own learning rate (``lr=0`` freezes the carried policy: its control) and an empty PPO buffer."""
        own_rng = self._rng_state.clone()
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError) as error:
            raise ValueError(
                f"policy.init_from: the carried policy does not fit this one ({str(error).splitlines()[0]}); expected "
                "a LearnedPolicy with the same hidden_size, num_layers and features."
            ) from None
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self._rng_state, self._buffer = own_rng, []

    # ------------------------------------------------------------------ state
    def _context(self, progress: float, d: float, learning: bool) -> torch.Tensor:
        """``[3]``: centred progress, recent reward level, loss trend (the loss EMA advances on learning steps)."""
        progress = min(max(float(progress), 0.0), 1.0)
        trend = 0.0
        if self._d_ema is not None and math.isfinite(d):
            trend = math.log(d + 1e-8) - math.log(self._d_ema + 1e-8)
        if learning and math.isfinite(d):
            self._d_ema = d if self._d_ema is None else 0.9 * self._d_ema + 0.1 * d
        values = torch.tensor([2.0 * progress - 1.0, self._recent_reward, trend], dtype=torch.float32)
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

    def inputs(self, ctx: StepContext, *, update_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network inputs ``[n, in_features]`` of a step and where they sit (updates the running statistics)."""
        f = ctx.features
        batch = f.batch()  # every process takes part in the reduction, whatever the granularity
        d = float(0.5 * (batch[0] + batch[1]))
        context = self._context(ctx.progress, d, learning=update_norm)
        raw, valid = self._state_rows(f)
        raw = self._transform(raw)
        if update_norm:
            self.norm.update(raw)
        return torch.cat([self.norm(raw), context.expand(raw.shape[0], -1)], dim=-1), valid

    # ------------------------------------------------------------------ act
    def select(self, ctx: StepContext) -> torch.Tensor:
        """The applied alpha; on reward steps (``ctx.candidates`` = K >= 1) also the K actions to credit."""
        f = ctx.features
        k = int(ctx.candidates)
        if self._pending and self._pending_step != ctx.step:
            self._pending = []  # a step whose reward never came (skipped as non-finite): nothing to credit
        self._pending_step = ctx.step
        x, valid = self.inputs(ctx)
        with torch.no_grad():
            dist = self.network(x)
            mean = dist.mean.clamp(self._EPS, 1 - self._EPS)
            need = max(k, 1 if self.apply == "sample" else 0)
            samples = None
            if need:
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(self._rng_state)
                    samples = dist.sample((need,)).clamp(self._EPS, 1 - self._EPS)  # [need, n]
                    self._rng_state = torch.get_rng_state()
                if valid is None:
                    samples = pdist.broadcast(samples, src=0)
            if k == 1 or (self.apply == "sample" and samples is not None):
                applied = samples[0]  # the legacy reward credits the action played; "sample" plays candidate 0
            else:
                applied = pdist.broadcast(mean, src=0) if valid is None else mean
            entropy = dist.entropy()
        if k:
            log_probs = dist.log_prob(samples[:k])
            self._pending.append(_Pending(x, samples[:k].clone(), log_probs, valid))
            self._candidates = [self._place(samples[i], valid).to(f.device) for i in range(k)]
        else:
            self._candidates = []
        alpha = self._place(applied, valid).to(f.device)
        self._log = {
            "policy_entropy": float(entropy.mean()) if entropy.numel() else float("nan"),
            "policy_concentration": (
                float((dist.concentration1 + dist.concentration0).mean()) if entropy.numel() else float("nan")
            ),
            "policy_mean": float(mean.mean()) if mean.numel() else float("nan"),
        }
        return alpha

    def candidate_actions(self) -> list[torch.Tensor]:
        """The K actions of the last ``select`` on a reward step, each in alpha's shape (empty otherwise)."""
        return list(self._candidates)

    @staticmethod
    def _place(actions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Actions back in alpha's shape; positions without a counted token get 0.5 (they weigh nothing)."""
        if valid is None:
            return actions.reshape(())
        alpha = torch.full(valid.shape, 0.5, dtype=torch.float32)
        alpha[valid.cpu()] = actions.float()
        return alpha

    # ------------------------------------------------------------------ learn
    def _rows(self, reward) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The pending actions as ``(x, actions, old log-probs, raw advantages)`` rows, and the mean reward."""
        pending = self._pending
        k = pending[0].candidates.shape[0]
        if k >= 2:  # paired: one reward per candidate, the same on every process
            r = torch.as_tensor(reward, dtype=torch.float64).reshape(-1).cpu()
            if r.numel() != k:
                raise ValueError(f"LearnedPolicy.update: {k} candidates were sampled, got {r.numel()} rewards")
            if not torch.isfinite(r).all():
                raise ValueError("LearnedPolicy.update: a candidate's reward is NaN or inf")
            adv = rl.leave_one_out(r)
            xs, acts, lps, advs = [], [], [], []
            for p in pending:
                n = p.candidates.shape[1]
                xs.append(p.inputs.repeat(k, 1))
                acts.append(p.candidates.reshape(-1))
                lps.append(p.log_probs.reshape(-1))
                advs.append(adv.repeat_interleave(n))
            return torch.cat(xs), torch.cat(acts), torch.cat(lps), torch.cat(advs), float(r.mean())
        # self-credit: every entry its own reward (a list with one entry per micro-batch, or one tensor)
        rewards = list(reward) if isinstance(reward, (list, tuple)) else [reward]
        if len(rewards) != len(pending):
            raise ValueError(
                f"LearnedPolicy.update: {len(pending)} select() calls are waiting, got {len(rewards)} rewards"
            )
        xs, acts, lps, rs = [], [], [], []
        for p, value in zip(pending, rewards):
            r = self._entry_rewards(value, p)
            xs.append(p.inputs)
            acts.append(p.candidates[0])
            lps.append(p.log_probs[0])
            rs.append(r)
        r = torch.cat(rs)
        sums = pdist.all_reduce_sum(torch.stack([r.sum(), r.new_tensor(float(r.numel()))]))
        mean = float(sums[0] / sums[1].clamp_min(1))
        if float(sums[1]) > 1:  # centred within the update: no baseline lag behind the learning-rate schedule
            baseline = mean
        else:  # one entry in all (batch granularity): only a moving average of earlier rewards can be its baseline
            baseline = mean if self._baseline is None else self._baseline
            self._baseline = mean if self._baseline is None else 0.9 * self._baseline + 0.1 * mean
        return torch.cat(xs), torch.cat(acts), torch.cat(lps), r - baseline, mean

    def _entry_rewards(self, reward, pending: _Pending) -> torch.Tensor:
        reward = torch.as_tensor(reward).detach().to("cpu", torch.float64)
        if pending.valid is None:
            if reward.numel() != 1:
                raise ValueError(
                    f"LearnedPolicy.update: granularity 'batch' needs a scalar reward, got shape {tuple(reward.shape)}"
                )
            r = reward.reshape(1)
        else:
            valid = pending.valid.cpu()
            if reward.shape == valid.shape:
                r = reward[valid]
            elif reward.shape == (pending.candidates.shape[1],):
                r = reward
            else:
                raise ValueError(
                    f"LearnedPolicy.update: granularity {self.granularity!r} needs a reward of shape "
                    f"{tuple(valid.shape)} (the alpha's shape) or {(pending.candidates.shape[1],)} (its counted "
                    f"entries), got {tuple(reward.shape)}"
                )
        if not torch.isfinite(r).all():
            raise ValueError("LearnedPolicy.update: the reward holds NaN or inf on counted entries")
        return r

    def update(self, reward) -> dict[str, float]:
        """Credit the actions of this step's ``select`` calls and improve the policy.

        Args:
            reward: paired credit (K >= 2 candidates): ``[K]``, one reward per candidate. Self credit (K = 1): per
                ``select`` call, a scalar (batch), ``[B]`` (sequence), ``[B, T]`` or the counted entries (token); a
                list with one such value per micro-batch.

        Returns:
            The update's statistics (also merged into ``last_log``): reward, advantage_std, policy_loss, ...
        """
        if not self._pending:
            raise RuntimeError("LearnedPolicy.update: no pending action; call select() with ctx.candidates >= 1 first")
        try:
            x, actions, old_log_probs, adv, mean_reward = self._rows(reward)
        finally:
            self._pending = []
            self._candidates = []
        raw_std = float(adv.std(unbiased=False)) if adv.numel() > 1 else 0.0
        # mean(A^2) over every process's entries, so that the scale (and the policy) is the same everywhere
        pooled = pdist.all_reduce_sum(torch.stack([adv.double().pow(2).sum(), adv.new_tensor(float(adv.numel()))]))
        scale = self.scale.update(float(pooled[0] / pooled[1].clamp_min(1))) if self.normalize_reward else 1.0
        adv = (adv / scale).float()
        self._recent_reward = 0.9 * self._recent_reward + 0.1 * max(min(mean_reward / scale, 5.0), -5.0)
        stats: dict[str, float] = {
            "reward": mean_reward,
            "advantage_std": raw_std,
            "reward_scale": float(scale),
            "policy_updated": 0.0,
        }
        if self.ppo_clip is None:
            dist = self.network(x)
            loss = rl.reinforce_loss(dist.log_prob(actions), adv, dist.entropy(), self.entropy_coef)
            self._step(loss)
            stats.update(policy_loss=float(loss.detach()), policy_updated=1.0)
        else:
            self._buffer.append((x, actions, old_log_probs, adv))
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
        if self.lr > 0:
            self.optimizer.step()

    def _ppo_update(self) -> dict[str, float]:
        x, actions, old_log_probs, adv = (torch.cat(parts) for parts in zip(*self._buffer))
        self._buffer.clear()
        for _ in range(self.ppo_epochs):
            dist = self.network(x)
            loss, clipped = rl.ppo_clip_loss(
                dist.log_prob(actions),
                old_log_probs,
                adv,
                dist.entropy(),
                clip=self.ppo_clip,
                entropy_coef=self.entropy_coef,
            )
            self._step(loss)
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
            "scale": self.scale.state_dict(),
            "d_ema": self._d_ema,
            "baseline": self._baseline,
            "recent_reward": self._recent_reward,
            "num_updates": self._num_updates,
            "rng_state": self._rng_state.clone(),
            "buffer": [tuple(t.clone() for t in entry) for entry in self._buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        if "zero_weight" not in state["network"]:  # a checkpoint written before the on_policy feature existed
            state = _with_on_policy_input(state, self.network.zero_weight)
        if state.get("granularity") != self.granularity:
            raise ValueError(
                f"LearnedPolicy.load_state_dict: checkpoint granularity {state.get('granularity')!r} does not match "
                f"this policy's {self.granularity!r}"
            )
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.norm.load_state_dict(state["norm"])
        self.scale.load_state_dict(state["scale"])
        self._d_ema = state["d_ema"]
        self._baseline = state.get("baseline")
        self._recent_reward = float(state["recent_reward"])
        self._num_updates = int(state["num_updates"])
        self._rng_state = state["rng_state"].clone()
        self._buffer = [tuple(t.clone() for t in entry) for entry in state["buffer"]]
        self._pending = []
        self._candidates = []


#: The network input of the ``on_policy`` feature (after the other statistics, before the three context inputs).
ON_POLICY_COLUMN = FEATURE_NAMES.index("on_policy")


def _with_on_policy_input(state: dict, zero_weight: torch.Tensor) -> dict:
    """A policy state written before the ``on_policy`` feature, with that input added: its zero weights (appended
    after the other parameters, so Adam's numbering of those stays), a zero column in the PPO buffer's states and a
    neutral running-norm entry (mean 0, var 1): the resumed policy computes what it computed before."""
    state = dict(state)
    state["network"] = {**state["network"], "zero_weight": torch.zeros_like(zero_weight)}
    optimizer = state["optimizer"]
    groups = [dict(g) for g in optimizer["param_groups"]]
    groups[-1]["params"] = [*groups[-1]["params"], max(p for g in groups for p in g["params"]) + 1]
    state["optimizer"] = {**optimizer, "param_groups": groups}
    norm = dict(state["norm"])
    column = ON_POLICY_COLUMN
    norm["mean"] = torch.cat([norm["mean"][:column], norm["mean"].new_zeros(1), norm["mean"][column:]])
    norm["var"] = torch.cat([norm["var"][:column], norm["var"].new_ones(1), norm["var"][column:]])
    state["norm"] = norm
    zeros = lambda x: torch.cat([x[..., :column], x.new_zeros(*x.shape[:-1], 1), x[..., column:]], dim=-1)  # noqa: E731
    state["buffer"] = [(zeros(entry[0]), *entry[1:]) for entry in state["buffer"]]
    return state


def carried_policy_state(path: str | Path) -> dict:
    """The learned policy's state in another run's checkpoint: ``path`` is a run directory (its newest complete
    checkpoint, verified against its manifest), a checkpoint directory or a ``state.pt`` file."""
    from arkd.checkpoint import STATE_FILE, latest_checkpoint, read_state, verify_checkpoint

    where = Path(path)
    if where.is_file():
        state = torch.load(where, map_location="cpu", weights_only=True)
    else:
        checkpoint = latest_checkpoint(where / "checkpoints") if (where / "checkpoints").is_dir() else where
        if checkpoint is None or not (checkpoint / STATE_FILE).is_file():
            raise ValueError(
                f"policy.init_from: no checkpoint at {where}; expected a run directory of arkd-train (with "
                "checkpoints/), a checkpoint directory or a state.pt file."
            )
        problem = verify_checkpoint(checkpoint)
        if problem is not None:
            raise ValueError(f"policy.init_from: {checkpoint} fails its manifest ({problem}); expected a complete one.")
        state = read_state(checkpoint)
    policy = state.get("strategy") if isinstance(state, dict) else None
    if not isinstance(policy, dict) or "network" not in policy:
        raise ValueError(f"policy.init_from: {where} holds no learned policy's state (a run of policy=learned).")
    return policy
