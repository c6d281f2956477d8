r"""Immediate reward signals for the alpha strategies: pure functions of logits and masks.

Notation: at a counted position, p is the teacher's and q the student's next-token distribution (softmax of logits /
temperature). The alignment of a student with the teacher on a set of counted tokens is

    D = mean over counted tokens of (KL(p || q) + KL(q || p)) / 2.

**Default reward: same-batch improvement.** After the optimiser step taken with alpha on batch x, one extra student
forward without gradient on the same x (the teacher logits are reused) gives

    r = D_before(x) - D_after(x),

the improvement in alignment that this step caused on the data it was computed from. It is the most direct credit
for the action (nothing but the step differs between the two terms), symmetric in FKL and RKL (so it does not favour
either end of alpha by construction), in nats, and costs one forward pass, which the trainer bounds by computing it
every ``reward.interval`` steps only. Alternatives, each a function below:

- ``next_batch_improvement``: r = D_before(x_t) - D_before(x_{t+1}); free (both terms come from training forwards)
  but noisier: batch-to-batch differences in difficulty swamp the step's effect.
- ``teacher_baseline``: r = mean over counted tokens of log q(y*) - log p(y*), y* = argmax p: how close the student's
  likelihood of the teacher's preferred token is to the teacher's own (0 when they agree; a level, not a change).
- ``js_similarity``: r = mean over counted tokens of exp(-JS(p, q)), bounded in [1/2, 1] (JS <= log 2): a bounded
  level of similarity, robust to outliers, but it credits the state as much as the action.

Every reward takes a ``granularity``: ``"batch"`` (a scalar), ``"sequence"`` (``[B]``: the mean over each row's
counted tokens, 0 for a row with none) or ``"token"`` (``[B, T]``, 0 where not counted), matching the shape of the
alpha it rewards. Rewards are computed without autograd and returned detached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from arkd.losses.functional import bidirectional_kl, js_divergence

GRANULARITIES = ("batch", "sequence", "token")


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None, where: str) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{where}: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape [B, T, V]"
        )
    if student_logits.dim() != 3:
        raise ValueError(f"{where}: logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(f"{where}: mask shape {tuple(mask.shape)} must be [B, T] = {tuple(student_logits.shape[:2])}")


def reduce_tokens(values: torch.Tensor, mask: torch.Tensor | None = None, granularity: str = "batch") -> torch.Tensor:
    """Reduce per-token values ``[B, T]`` over the counted tokens.

    Args:
        values: ``[B, T]`` per-token values.
        mask: ``[B, T]`` bool, True = counted; None counts everything.
        granularity: ``"batch"`` -> ``[]`` mean over all counted tokens; ``"sequence"`` -> ``[B]`` mean per row;
            ``"token"`` -> ``[B, T]``. Uncounted positions are 0; a reduction with no counted token is 0.

    Returns:
        ``[]``, ``[B]`` or ``[B, T]``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if mask is None:
        mask = torch.ones_like(values, dtype=torch.bool)
    mask = mask.to(device=values.device, dtype=torch.bool)
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if granularity == "token":
        return values
    if granularity == "sequence":
        return values.sum(-1) / mask.sum(-1).clamp_min(1).to(values.dtype)
    return values.sum() / mask.sum().clamp_min(1).to(values.dtype)


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.detach().float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return log_q, log_p


@torch.no_grad()
def token_alignment(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token ``(KL(p || q) + KL(q || p)) / 2`` of ``[..., V]`` logits: ``[...]`` (0 where not counted).

    This is ``arkd.losses.bidirectional_kl`` at ``alpha = 0.5`` (its chunked path: fp32, -inf safe, a few
    ``[chunk, V]`` buffers), evaluated without autograd.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return bidirectional_kl(
        student_logits.detach(), teacher_logits.detach(), mask, temperature=temperature, alpha=0.5, reduction="none"
    ).float()


def alignment(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    granularity: str = "batch",
) -> torch.Tensor:
    """D = (FKL + RKL) / 2 over the counted tokens (lower is better aligned).

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``.
        mask: ``[B, T]`` bool, True = counted.
        temperature: softmax temperature of both distributions.
        granularity: ``"batch"`` (``[]``), ``"sequence"`` (``[B]``) or ``"token"`` (``[B, T]``).
    """
    _check(student_logits, teacher_logits, mask, "alignment")
    values = token_alignment(student_logits, teacher_logits, mask, temperature=temperature)
    return reduce_tokens(values, mask, granularity)


def improvement(d_before: torch.Tensor | float, d_after: torch.Tensor | float) -> torch.Tensor:
    """``d_before - d_after``: positive when alignment improved (any matching shapes)."""
    return torch.as_tensor(d_before) - torch.as_tensor(d_after)


def same_batch_improvement(
    student_logits_before: torch.Tensor,
    student_logits_after: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    granularity: str = "batch",
) -> torch.Tensor:
    """The default reward: D on a batch before the step minus D on the same batch after it.

    Args:
        student_logits_before: ``[B, T, V]`` from the training forward (detached here).
        student_logits_after: ``[B, T, V]`` from one extra forward without gradient after the optimiser step.
        teacher_logits: ``[B, T, V]``, reused from the training step.
        mask: ``[B, T]`` bool.
        temperature: softmax temperature.
        granularity: ``"batch"``, ``"sequence"`` or ``"token"`` (the shape of the alpha being rewarded).
    """
    before = alignment(student_logits_before, teacher_logits, mask, temperature=temperature, granularity=granularity)
    after = alignment(student_logits_after, teacher_logits, mask, temperature=temperature, granularity=granularity)
    return improvement(before, after)


def next_batch_improvement(d_current: torch.Tensor | float, d_next: torch.Tensor | float) -> torch.Tensor:
    """``D(x_t) - D(x_{t+1})``, both measured by the training forwards before their steps (batch-level only).

    Raises:
        ValueError: when either value is not a scalar (different batches hold different sequences).
    """
    d_current, d_next = torch.as_tensor(d_current), torch.as_tensor(d_next)
    if d_current.numel() != 1 or d_next.numel() != 1:
        raise ValueError(
            "next_batch_improvement: both alignments must be scalars (batch granularity), got shapes "
            f"{tuple(d_current.shape)} and {tuple(d_next.shape)}"
        )
    return (d_current - d_next).reshape(())


@torch.no_grad()
def teacher_baseline(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    granularity: str = "batch",
) -> torch.Tensor:
    """``log q(y*) - log p(y*)`` with ``y* = argmax p``: the student's log-likelihood of the teacher's preferred token
    relative to the teacher's own (0 when they assign it the same probability).

    Args and shapes as ``alignment``.
    """
    _check(student_logits, teacher_logits, mask, "teacher_baseline")
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature)
    log_p_top, top = log_p.max(dim=-1, keepdim=True)
    values = (log_q.gather(-1, top) - log_p_top).squeeze(-1)
    return reduce_tokens(values, mask, granularity)


@torch.no_grad()
def js_similarity(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    granularity: str = "batch",
) -> torch.Tensor:
    """Mean over counted tokens of ``exp(-JS(p, q))``, ``JS = (KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``.

    Bounded in [1/2, 1] (1 iff p = q). Args and shapes as ``alignment``.
    """
    _check(student_logits, teacher_logits, mask, "js_similarity")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    js = js_divergence(
        student_logits.detach(), teacher_logits.detach(), mask, temperature=temperature, reduction="none"
    ).float()
    return reduce_tokens(torch.exp(-js), mask, granularity)


def linear_lookahead(
    params: Mapping[str, torch.Tensor],
    grad_fkl: Mapping[str, torch.Tensor | None],
    grad_rkl: Mapping[str, torch.Tensor | None],
    *,
    lr: float,
    reward_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor | float],
    update: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    max_grad_norm: float | None = None,
) -> Callable[[float], float]:
    """A one-step look-ahead ``alpha -> reward`` from two backward passes instead of one per candidate.

    With a scalar alpha the loss ``alpha * FKL + (1 - alpha) * RKL`` has the gradient
    ``g(alpha) = alpha * g_F + (1 - alpha) * g_R``, linear in alpha. So after one backward of FKL (``grad_fkl``) and
    one of RKL (``grad_rkl``), the step of any alpha follows from ``g(alpha)``, and trying K alphas costs K forwards
    without gradient (inside ``reward_fn``), e.g. through ``torch.func.functional_call``.

    The simulated step should be the one the optimiser would take: pass ``update`` (e.g.
    :func:`adam_step_preview` of the run's optimiser) and the run's ``max_grad_norm``. The default is plain SGD,
    ``theta - lr * g(alpha)``; beware that its first-order reward is linear in alpha, so the best candidate is then
    nearly always an end point (0 or 1, whichever gradient is longer), whereas an adaptive optimiser's step is not
    linear in ``g``.

    Args:
        params: name -> parameter tensor (the current student).
        grad_fkl: name -> gradient of the FKL loss (None or missing: the parameter does not move).
        grad_rkl: name -> gradient of the RKL loss.
        lr: step size of the default SGD step (unused with ``update``).
        reward_fn: new parameters (name -> tensor) -> reward (higher is better), e.g. ``D_before - D(new params)``.
        update: ``(params, grads) -> new params`` for the parameters that have a gradient, without side effects.
        max_grad_norm: clip the global L2 norm of ``g(alpha)`` to this first, as the trainer does (None: no clipping).

    Returns:
        ``lookahead(alpha) -> float``, evaluated without autograd.
    """

    def sgd(current: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: current[name].detach() - lr * grad for name, grad in grads.items()}

    step_fn = update or sgd

    def lookahead(alpha: float) -> float:
        alpha = float(alpha)
        with torch.no_grad():
            grads: dict[str, torch.Tensor] = {}
            for name in params:
                g_f, g_r = grad_fkl.get(name), grad_rkl.get(name)
                grad = None
                if g_f is not None:
                    grad = alpha * g_f
                if g_r is not None:
                    grad = (1 - alpha) * g_r if grad is None else grad + (1 - alpha) * g_r
                if grad is not None:
                    grads[name] = grad
            if max_grad_norm is not None and max_grad_norm > 0 and grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
                scale = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
                grads = {name: g * scale for name, g in grads.items()}
            moved = step_fn(params, grads)
            new_params = {name: moved.get(name, theta.detach()) for name, theta in params.items()}
            return float(reward_fn(new_params))

    return lookahead


def adam_step_preview(
    optimizer: torch.optim.Optimizer,
) -> Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``(params, grads) -> new params``: the step ``torch.optim.Adam`` / ``AdamW`` would take from ``grads`` now,
    computed from its state (moments, step count, learning rate, betas, eps, weight decay, amsgrad, maximize) without
    changing it. The ``update`` of :func:`linear_lookahead`.

    Args:
        optimizer: the run's optimiser (or an accelerate wrapper of one) over the parameters passed in ``params``.

    Raises:
        TypeError: the optimiser is not Adam or AdamW.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer keeps the torch one here
    if not isinstance(inner, torch.optim.Adam):  # AdamW subclasses Adam
        raise TypeError(
            f"adam_step_preview: the optimizer is {type(inner).__name__}; expected torch.optim.Adam or AdamW "
            "(use linear_lookahead's default SGD step, or an update function for this optimizer)."
        )
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    decoupled_default = isinstance(inner, torch.optim.AdamW)

    def preview(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if grads and not any(id(params[name]) in group_of for name in grads):
            raise ValueError(
                "adam_step_preview: none of the parameters with a gradient is one the optimizer holds; expected the "
                "optimizer's own parameter tensors (e.g. model.named_parameters() of the model it was built on)."
            )
        out: dict[str, torch.Tensor] = {}
        for name, grad in grads.items():
            theta = params[name]
            group = group_of.get(id(theta))
            if group is None:  # not optimised: it does not move
                continue
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            lr = float(lr)
            state = inner.state.get(theta, {})
            p = theta.detach().float()
            g = -grad.float() if group.get("maximize", False) else grad.float()
            if weight_decay and group.get("decoupled_weight_decay", decoupled_default):
                p = p * (1 - lr * weight_decay)
            elif weight_decay:
                g = g + weight_decay * theta.detach().float()
            step = float(state["step"]) + 1 if "step" in state else 1.0
            exp_avg = state["exp_avg"].float() if "exp_avg" in state else torch.zeros_like(p)
            exp_avg_sq = state["exp_avg_sq"].float() if "exp_avg_sq" in state else torch.zeros_like(p)
            m = beta1 * exp_avg + (1 - beta1) * g
            v = beta2 * exp_avg_sq + (1 - beta2) * g * g
            if group.get("amsgrad", False):
                v = torch.maximum(state["max_exp_avg_sq"].float(), v) if "max_exp_avg_sq" in state else v
            denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
            out[name] = (p - (lr / (1 - beta1**step)) * m / denom).to(theta.dtype)
        return out

    return preview
