"""Alpha control: the strategy, its reward, the alpha-signal probe and the step preview behind a few calls that any
training loop makes at visible points.

The loop (arkd's :class:`arkd.trainer.Trainer`, a Hugging Face / TRL trainer, or ten lines of your own) asks::

    ctl = control.begin(step)                       # what is due this step: a reward, the probe, greedy's search
    for each micro-batch:
        alpha = ctl.choose(features)                # the strategy's decision (one per step at batch granularity)
        ctl.record(kd, alpha=alpha, ...)            # what a preview needs: dg/dalpha, candidate offsets, the batch
        backward of kd(alpha) / N
    ctl.after_gradient()                            # the window's gradient; greedy chooses from previews of it
    clip, check the loss and the gradient norm
    row = ctl.measure(next_batch)                   # from the optimiser state before the step: paired reward, probe
    optimizer.step()
    row |= ctl.after_step()                         # the legacy same-batch reward

It is handed what it needs (the model, its optimiser, the next batch when a preview scores it) and never calls back
into the loop. :class:`NoControl` is the same object without a strategy (plain SFT, a loss that takes no alpha).
Every collective it runs is the same on every process in the same order (the direction's all-reduce, the scorers').
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from arkd import distributed as pdist
from arkd.data.collate import drop_last_position, shift_labels
from arkd.policy.features import Features, compute_features
from arkd.policy.lookahead import BatchScorer, StepPreview, as_params, step_preview_for
from arkd.policy.strategies import StepContext
from arkd.reward import token_alignment

__all__ = ["PROVISIONAL_ALPHA", "AlphaControl", "NoControl", "StepControl", "masked_alpha_values"]

PROVISIONAL_ALPHA = 0.5  # the alpha of the window's backward when the strategy chooses after the gradient (greedy)


@dataclass
class Plan:
    """What a step computes besides its update."""

    candidates: int = 0  # actions the reward scores (0: no reward this step)
    paired: bool = False  # the paired counterfactual reward
    legacy: bool = False  # the same-batch self-improvement reward
    probe: bool = False  # the alpha-signal probe
    after: bool = False  # the strategy chooses after the window's gradient (greedy)
    direction: bool = False  # dg/dalpha is needed
    batch_level: bool = True  # one alpha per optimiser step

    @property
    def needs_preview(self) -> bool:
        return self.paired or self.probe or self.after


@dataclass
class _Kept:
    """A micro-batch as a preview or the legacy reward needs it afterwards (detached)."""

    batch: dict[str, torch.Tensor]
    teacher_logits: Any
    mask: torch.Tensor
    student_logits: torch.Tensor | None
    rng: Any
    features: Features | None


class AlphaControl:
    """The strategy that chooses alpha, the reward it learns from and the probe, driven by a training loop.

    Args:
        strategy: an ``arkd.policy.AlphaStrategy`` (None: no alpha control, as :class:`NoControl`).
        reward: ``arkd.reward.PairedReward`` or ``SameBatchReward`` (needed when ``strategy.needs_reward``).
        probe: an ``arkd.policy.AlphaSignalProbe`` (None: no probe).
        model: the student module (unwrapped): its trainable parameters are previewed and scored.
        optimizer: the student's optimiser (its update is previewed from its state: Adam / AdamW exactly, SGD else).
            ``model`` and ``optimizer`` may be set later, as attributes, before the first :meth:`begin` (a Trainer
            integration binds its own); :meth:`begin` refuses a control that previews without them.
        max_steps: the run's length (a strategy's ``progress``).
        max_grad_norm: the loop's clipping threshold (None or <= 0: none), applied to previewed steps too.
        temperature: of the features and of the reward's ``D = (FKL + RKL) / 2``.
        from_hidden: score previews from the final hidden states (``trainer.fused_linear``).
    """

    def __init__(
        self,
        strategy: Any,
        *,
        reward: Any = None,
        probe: Any = None,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        max_steps: int = 1,
        max_grad_norm: float | None = None,
        temperature: float = 1.0,
        from_hidden: bool = False,
    ) -> None:
        if strategy is not None and strategy.needs_reward and reward is None:
            raise ValueError(f"{type(strategy).__name__} learns from rewards: set the `reward` config.")
        if strategy is None and probe is not None:
            raise ValueError("the alpha-signal probe measures a strategy's alpha: give a strategy, or probe=None.")
        self.strategy, self.reward, self.probe = strategy, reward, probe
        self.model, self.optimizer = model, optimizer
        self.max_steps, self.max_grad_norm = max_steps, max_grad_norm
        self.temperature, self.from_hidden = temperature, from_hidden
        self._held: float | None = None
        self._shift: float | None = None

    @property
    def wants_features(self) -> bool:
        """Whether the loop computes the teacher-student features and asks :meth:`StepControl.choose`."""
        return self.strategy is not None

    @property
    def feature_options(self) -> dict[str, Any]:
        """Keyword arguments of ``compute_features`` the strategy asks for (e.g. AKL's ``mu``)."""
        return dict(self.strategy.feature_options) if self.strategy is not None else {}

    @property
    def previews(self) -> bool:
        """Whether some step previews the optimiser step for other alphas (needs the full parameters and plain
        gradients on every process: no FSDP, DeepSpeed or fp16 gradient scaler)."""
        s = self.strategy
        if s is None:
            return False
        paired = s.needs_reward and self.reward is not None and not self.reward.branches
        paired = paired and int(self.reward.candidates) >= 2
        return paired or self.probe is not None or s.chooses_after_gradient

    @property
    def needs_student_logits(self) -> bool:
        """Whether the reward compares the student's logits before and after a step (the legacy same-batch reward;
        ``trainer.fused_linear`` never builds them)."""
        return self.strategy is not None and self.reward is not None and bool(self.reward.needs_student_logits)

    def features(self, student_logits: torch.Tensor, teacher_logits: Any, mask: torch.Tensor) -> Features:
        """The strategy's view of a micro-batch (``compute_features`` at the control's temperature)."""
        options = {"temperature": self.temperature, **self.feature_options}
        return compute_features(student_logits.detach(), teacher_logits, mask, **options)

    def plan(self, step: int) -> Plan:
        """What optimiser step ``step + 1`` computes besides the update."""
        strategy = self.strategy
        if strategy is None:
            return Plan()
        due = self.reward is not None and not self.reward.branches and self.reward.due(step + 1)
        due = strategy.needs_reward and due
        k = int(self.reward.candidates) if due else 0
        probe = self.probe is not None and self.probe.due(step + 1)
        after = strategy.chooses_after_gradient and self._held is None and self._shift is None
        batch_level = strategy.granularity == "batch"
        return Plan(
            candidates=k,
            paired=due and k >= 2,
            legacy=due and k == 1,
            probe=probe,
            after=after,
            direction=after or probe or (due and k >= 2 and batch_level),
            batch_level=batch_level,
        )

    @property
    def horizon(self) -> int:
        """Steps per segment of a reward measured over real training steps (0: a per-step reward or none)."""
        if self.strategy is None or self.reward is None or not self.reward.branches:
            return 0
        return int(self.reward.horizon)

    def segment_due(self, step: int) -> bool:
        """Whether a decided segment of the horizon reward starts after ``step`` steps."""
        return self.horizon > 0 and self.strategy.needs_reward and self.reward.due(step)

    def begin_segment(self, step: int, features: Features) -> tuple[float, list[float]]:
        """The decision at a segment's start state: the policy's mean alpha and its K sampled candidates."""
        ctx = StepContext(features=features, progress=step / self.max_steps, step=step,
                          candidates=int(self.reward.candidates))  # fmt: skip
        mean = float(torch.as_tensor(self.strategy.select(ctx)).float().mean())
        return mean, [float(c) for c in self.strategy.candidate_actions()]

    def finish_segment(self, rewards: torch.Tensor) -> None:
        """Credit the segment's candidates (leave-one-out across them) at the segment's start state."""
        self.strategy.update(rewards)

    def hold(self, alpha: float | None = None, *, shift: float | None = None) -> None:
        """Apply ``alpha`` at every step (a branch of the horizon reward), or the strategy's own alpha moved by
        ``shift`` and clamped to [0, 1] (a branch of the horizon probe), until ``hold()``."""
        self._held, self._shift = alpha, shift

    def begin(self, step: int) -> StepControl:
        """Start optimiser step ``step + 1`` (``step`` steps taken)."""
        if self.previews and (self.model is None or self.optimizer is None):
            raise ValueError(
                "this alpha control previews steps (a paired reward, the probe or greedy search): give model= and "
                "optimizer=."
            )
        return StepControl(self, step, self.plan(step))

    def scorer(self, parts: list[tuple[dict[str, torch.Tensor], Any, torch.Tensor]]) -> BatchScorer:
        """``D = (FKL + RKL) / 2`` of ``(batch, shifted teacher logits, shifted mask)`` parts at any parameters."""
        temperature = self.temperature
        return BatchScorer(
            self.model,
            [p[0] for p in parts],
            [p[1] for p in parts],
            [p[2] for p in parts],
            lambda s, t, m: token_alignment(s, t, m, temperature=temperature),
            from_hidden=self.from_hidden,
        )

    def merge_log(self, row: dict[str, Any]) -> dict[str, Any]:
        """The step's row with the strategy's own statistics (policy entropy, concentration, rewards, ...); the
        loop's window-wide alpha statistics and losses win."""
        if self.strategy is not None:
            merged = {"step": row["step"], **self.strategy.last_log()}
            merged.update({k: v for k, v in row.items() if v is not None or k not in merged})
            row = merged
        row.setdefault("policy_entropy", None)
        return row


def NoControl() -> AlphaControl:  # noqa: N802 - reads as a class at the call site
    """Alpha control without a strategy: no features, no alpha, nothing previewed or measured."""
    return AlphaControl(None)


class StepControl:
    """One optimiser step's alpha control (from :meth:`AlphaControl.begin`)."""

    def __init__(self, control: AlphaControl, step: int, plan: Plan) -> None:
        self.control, self.step, self.plan = control, step, plan
        self.candidates: list[list[torch.Tensor]] = []  # one list per decision of a reward step
        self._shared: list[torch.Tensor] = []  # the step's decision at batch granularity
        self._kept: list[_Kept] = []
        self._alphas: list[torch.Tensor] = []  # the applied alphas of the counted tokens (for the log)
        self._params = as_params(control.model) if control.model is not None and plan.needs_preview else {}
        self._direction: dict[str, torch.Tensor] = {}
        self._offsets: list[dict[str, torch.Tensor]] = []
        self.preview: StepPreview | None = None
        self._gradient_done = False

    @property
    def wants_features(self) -> bool:
        return self.control.wants_features

    @property
    def feature_options(self) -> dict[str, Any]:
        return self.control.feature_options

    def _context(self, features: Features, **extra: Any) -> StepContext:
        progress = self.step / self.control.max_steps
        return StepContext(features=features, progress=progress, step=self.step, **extra)

    def choose(self, features: Features) -> torch.Tensor:
        """Alpha for a micro-batch: one decision per optimiser step at batch granularity (on the first micro-batch's
        features), one per micro-batch otherwise; greedy's provisional alpha until the gradient is known."""
        strategy = self.control.strategy
        if self.control._held is not None:  # a branch of the horizon reward or probe: alpha held for its steps
            alpha = torch.tensor(self.control._held, dtype=torch.float32, device=features.device)
            self._shared.append(alpha)
            return alpha
        if strategy.chooses_after_gradient and self.control._shift is None:  # replaced once the gradient is known
            return torch.tensor(PROVISIONAL_ALPHA, device=features.device)
        if self.plan.batch_level and self._shared:
            return self._shared[0]
        ctx = self._context(features, candidates=self.plan.candidates)
        alpha = torch.as_tensor(strategy.select(ctx), dtype=torch.float32, device=features.device)
        if self.control._shift is not None:
            alpha = (alpha + self.control._shift).clamp(0.0, 1.0)
        if self.plan.candidates:
            self.candidates.append([c.to(features.device) for c in strategy.candidate_actions()])
        self._shared.append(alpha)
        return alpha

    def record(
        self,
        kd: Callable[[Any], torch.Tensor] | None,
        *,
        alpha: torch.Tensor | None,
        batch: dict[str, torch.Tensor],
        teacher_logits: Any,
        mask: torch.Tensor,
        scale: float,
        student_logits: torch.Tensor | None = None,
        rng: Any = None,
        features: Features | None = None,
    ) -> None:
        """What previews and rewards need of a micro-batch, before its backward.

        Args:
            kd: ``alpha -> KD sum`` of the micro-batch with its autograd graph (the loss is linear in alpha); None
                without a KD term.
            alpha: the alpha it used (None without a strategy).
            batch, teacher_logits, mask: the micro-batch, the teacher's shifted logits ``[B, T-1, V]`` and the
                shifted counted-token mask (what the loss saw).
            scale: the factor of the backward's gradient per unit of the KD sum (``kd_weight / N``, N the window's
                counted tokens over all processes).
            student_logits: the student's shifted logits (kept, detached, for the legacy reward only).
            rng: the random state before the student forward (the legacy reward replays its dropout masks).
            features: the features the strategy saw (greedy chooses from those of the first micro-batch).
        """
        plan = self.plan
        if alpha is not None:
            self._alphas.append(masked_alpha_values(alpha, mask))
        if plan.direction:  # dg/dalpha: the gradient of kd_weight * (sum FKL - sum RKL) / N
            _accumulate(self._direction, self._params, scale * (kd(1.0) - kd(0.0)))
        if plan.paired and not plan.batch_level and self.candidates:  # per-sequence / per-token candidates
            for k, candidate in enumerate(self.candidates[-1]):
                # a fresh evaluation at the applied alpha: the fast path's backward runs once per forward
                if len(self._offsets) <= k:
                    self._offsets.append({})
                _accumulate(self._offsets[k], self._params, scale * (kd(candidate) - kd(alpha)))
        keep_teacher = plan.needs_preview or plan.legacy
        self._kept.append(
            _Kept(
                batch=batch,
                teacher_logits=teacher_logits if keep_teacher else None,
                mask=mask,
                student_logits=student_logits.detach() if plan.legacy and student_logits is not None else None,
                rng=rng,
                features=features,
            )
        )

    def after_gradient(self) -> None:
        """After the window's backward, before clipping: the unclipped gradient for previews, and a strategy that
        chooses after seeing it (greedy) moves the gradient to its choice."""
        if self._gradient_done:
            return
        self._gradient_done = True
        plan, control = self.plan, self.control
        for part in (self._direction, *self._offsets):
            _all_reduce_sum(part)
        if not plan.needs_preview:
            return
        params = self._params
        alpha = self._kept_alpha()
        update = step_preview_for(control.optimizer)
        self.preview = StepPreview(
            params, _gradients(params), update, alpha=alpha, direction=self._direction or None,
            max_grad_norm=control.max_grad_norm,
        )  # fmt: skip
        if plan.after:
            self._greedy()

    def _kept_alpha(self) -> torch.Tensor:
        if self.plan.batch_level or not self._alphas:
            return self._shared[0] if self._shared else torch.tensor(PROVISIONAL_ALPHA)
        return torch.cat(self._alphas)

    def _greedy(self) -> None:
        preview, params = self.preview, self._params
        same = self._same_scorer()
        base = same()
        lookahead = lambda a: base - same(preview.params_at(float(a) - PROVISIONAL_ALPHA))  # noqa: E731
        chosen = float(self.control.strategy.select(self._context(self._kept[0].features, lookahead=lookahead)))
        for name, d in self._direction.items():  # the chosen alpha's gradient from the provisional one's
            grad = params[name].grad
            if grad is not None:
                grad.add_(d.to(grad.dtype), alpha=chosen - PROVISIONAL_ALPHA)
        self.preview = StepPreview(
            params, _gradients(params), preview.update, alpha=torch.tensor(chosen), direction=self._direction,
            max_grad_norm=self.control.max_grad_norm,
        )  # fmt: skip
        self._alphas = [torch.tensor([chosen])]

    def alpha_row(self) -> dict[str, float | None]:
        """``alpha_mean`` and ``alpha_std`` over the applied alphas of the counted tokens (None without)."""
        values = torch.cat(self._alphas) if self._alphas else None
        if values is None or not values.numel():
            return {"alpha_mean": None, "alpha_std": None}
        return {"alpha_mean": values.mean().item(), "alpha_std": values.std(unbiased=False).item()}

    def _same_scorer(self) -> BatchScorer:
        return self.control.scorer([(k.batch, k.teacher_logits, k.mask) for k in self._kept])

    def measure(self, next_batch: Callable[[], tuple[dict[str, torch.Tensor], Any]] | None = None) -> dict[str, Any]:
        """Counterfactuals from the optimiser state before the step (call it before ``optimizer.step()``): the
        paired reward (the policy learns from it) and the probe; the row to log.

        Args:
            next_batch: ``() -> (batch, teacher logits [B, T, V])`` of data this step does not train on (the next
                training batch), called only on the steps that score it.
        """
        self.after_gradient()
        plan, control = self.plan, self.control
        row: dict[str, Any] = {}
        if not (plan.paired or plan.probe):
            return row
        batch, teacher = next_batch()
        _, m_next = shift_labels(batch)
        held_out = control.scorer([(batch, drop_last_position(teacher), m_next)])
        same = self._same_scorer()
        if plan.paired:
            rewards = control.reward.measure(self.preview, held_out, same, self.candidates, self._offsets)
            control.strategy.update(rewards)
            row["reward"] = float(rewards.mean())
        if plan.probe:
            row.update(control.probe.measure(self.preview, held_out, same))
        return row

    def after_step(self) -> dict[str, Any]:
        """After ``optimizer.step()``: the legacy same-batch reward (the applied action's improvement on its own
        micro-batches, the training forward's dropout masks replayed); the row to log."""
        if not self.plan.legacy:
            return {}
        control = self.control
        kept = [(k.batch, k.student_logits, k.teacher_logits, k.mask, k.rng) for k in self._kept]
        granularity = control.strategy.granularity
        mean, per_batch = control.reward.measure(control.model, kept, temperature=control.temperature,
                                                 granularity=granularity)  # fmt: skip
        control.strategy.update(torch.tensor(mean) if granularity == "batch" else per_batch)
        return {"reward": mean}


def masked_alpha_values(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The alpha values that weighed counted tokens, flat (for the logged mean / std)."""
    alpha = alpha.detach().float()
    if alpha.dim() == 0:
        return alpha.reshape(1)
    if alpha.dim() == 1:
        return alpha[mask.any(dim=-1)] if alpha.shape[0] == mask.shape[0] else alpha
    return alpha[mask] if alpha.shape == mask.shape else alpha.reshape(-1)


def _accumulate(store: dict[str, torch.Tensor], params: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
    """``store[name] += d loss / d params[name]`` (the graph is kept for the step's own backward)."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
    for name, g in zip(names, grads):
        if g is None:
            continue
        store[name] = g.detach() if name not in store else store[name] + g.detach()


def _all_reduce_sum(tensors: dict[str, torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place (nothing in one process)."""
    if not tensors or not pdist.is_distributed():
        return
    import torch.distributed as dist

    for value in tensors.values():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)


def _gradients(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> a copy of the parameter's gradient (after the window's backward: averaged over processes)."""
    return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
