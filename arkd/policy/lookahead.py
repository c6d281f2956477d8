"""The one step preview: the parameters the trainer's real optimiser step would reach for another alpha.

Greedy search, the alpha-signal probe and the paired reward all ask the same question: "had this step used alpha'
instead of alpha, where would the student be, and how well would it then match the teacher?" This module answers
it from what the step already has, without a second teacher forward:

- ``grad``: the window's real gradient ``g(alpha)`` (token-normalised, averaged over processes, before clipping);
- ``direction``: ``d = dg / d alpha``, the gradient of ``kd_weight * (sum FKL - sum RKL) / N`` (one extra backward
  through the step's own graph), so that shifting every alpha by ``delta`` gives ``g(alpha + delta) = g + delta d``
  exactly (the loss is linear in alpha);
- ``offset``: for a candidate that is not a uniform shift (one alpha per sequence or token), its exact gradient
  difference ``g(alpha') - g(alpha)`` from one backward of ``loss(alpha') - loss(alpha)``.

:class:`StepPreview` then applies the trainer's clipping rule (``torch.nn.utils.clip_grad_norm_``) and the
optimiser's own update from its current state (:func:`adam_step_preview`: Adam / AdamW moments, bias correction,
weight decay; plain SGD for other optimisers) without changing anything. :class:`BatchScorer` measures
``D = (FKL + RKL) / 2`` of a batch (the teacher logits given) at any parameters, in eval mode (no dropout noise), with
``torch.func.functional_call``, reduced over processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from arkd import distributed as pdist
from arkd.data.collate import drop_last_position

Params = dict[str, torch.Tensor]
UpdateFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Params]


def adam_step_preview(optimizer: torch.optim.Optimizer) -> UpdateFn:
    """``(params, grads) -> new params``: the step ``torch.optim.Adam`` / ``AdamW`` would take from ``grads`` now,
    computed from its state (moments, step count, learning rate, betas, eps, weight decay, amsgrad, maximize) without
    changing it.

    Args:
        optimizer: the run's optimiser (or an accelerate wrapper of one) over the parameters passed in ``params``.

    Raises:
        TypeError: the optimiser is not Adam or AdamW.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer keeps the torch one here
    if not isinstance(inner, torch.optim.Adam):  # AdamW subclasses Adam
        raise TypeError(
            f"adam_step_preview: the optimizer is {type(inner).__name__}; expected torch.optim.Adam or AdamW "
            "(use sgd_step_preview, or an update function for this optimizer)."
        )
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    decoupled_default = isinstance(inner, torch.optim.AdamW)

    def preview(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> Params:
        if grads and not any(id(params[name]) in group_of for name in grads):
            raise ValueError(
                "adam_step_preview: none of the parameters with a gradient is one the optimizer holds; expected the "
                "optimizer's own parameter tensors (e.g. model.named_parameters() of the model it was built on)."
            )
        out: Params = {}
        for name, grad in grads.items():
            theta = params[name]
            group = group_of.get(id(theta))
            if group is None:  # not optimised: it does not move
                continue
            lr, (beta1, beta2) = float(group["lr"]), group["betas"]
            eps, weight_decay = group["eps"], group["weight_decay"]
            state = inner.state.get(theta, {})
            p = theta.detach().float()
            g = -grad.float() if group.get("maximize", False) else grad.float()
            if weight_decay and group.get("decoupled_weight_decay", decoupled_default):
                p = p * (1 - lr * weight_decay)
            elif weight_decay:
                g = g + weight_decay * theta.detach().float()
            step = float(state["step"]) + 1 if "step" in state else 1.0
            # m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2, each one new tensor (the rest in place): a preview's
            # transient memory is a few copies of the largest parameter, not of the model
            m = g.mul(1 - beta1)
            if "exp_avg" in state:
                m.add_(state["exp_avg"].float(), alpha=beta1)
            v = g.mul(g).mul_(1 - beta2)
            if "exp_avg_sq" in state:
                v.add_(state["exp_avg_sq"].float(), alpha=beta2)
            if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
                torch.maximum(state["max_exp_avg_sq"].float(), v, out=v)
            denom = v.sqrt_().div_(math.sqrt(1 - beta2**step)).add_(eps)
            update = m.div_(denom).mul_(lr / (1 - beta1**step))
            del v, denom
            out[name] = (p - update).to(theta.dtype)
            del m, update
        return out

    return preview


def sgd_step_preview(optimizer: torch.optim.Optimizer) -> UpdateFn:
    """``(params, grads) -> params - lr * grads`` at the optimiser's current learning rate (first group's)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    lr = float(inner.param_groups[0]["lr"])

    def preview(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> Params:
        return {name: params[name].detach() - lr * g.to(params[name].dtype) for name, g in grads.items()}

    return preview


def step_preview_for(optimizer: torch.optim.Optimizer) -> UpdateFn:
    """The exact preview for Adam / AdamW, a plain SGD step at the current learning rate otherwise."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return adam_step_preview(inner) if isinstance(inner, torch.optim.Adam) else sgd_step_preview(inner)


def global_norm(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all tensors (as ``clip_grad_norm_`` computes it)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()]))


class StepPreview:
    """``alpha -> theta'``: the trainer's real step for the applied alpha shifted by ``delta`` (or any offset).

    Args:
        params: name -> the student's trainable parameter tensors (the optimiser's own).
        grad: name -> the window's gradient ``g(alpha)`` (unclipped, unscaled, averaged over processes).
        update: ``(params, grads) -> new params`` (:func:`step_preview_for`).
        alpha: the applied alpha (a tensor: ``[]``, ``[B]`` or ``[B, T]`` of the last micro-batch; its mean is
            reported).
        direction: name -> ``dg/dalpha`` for uniform shifts (None where not computed).
        max_grad_norm: the trainer's clipping threshold (None or <= 0: no clipping).
        equal_norm: rescale every candidate's gradient to the norm of ``g(alpha)`` before clipping, so that
            candidates differ in direction only (``reward.equal_norm``).
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        grad: Mapping[str, torch.Tensor],
        update: UpdateFn,
        *,
        alpha: torch.Tensor | float,
        direction: Mapping[str, torch.Tensor] | None = None,
        max_grad_norm: float | None = None,
        equal_norm: bool = False,
    ) -> None:
        self.params = dict(params)
        self.grad = dict(grad)
        self.direction = None if direction is None else dict(direction)
        self.update = update
        self.alpha = torch.as_tensor(alpha, dtype=torch.float32).detach()
        self.max_grad_norm = max_grad_norm
        self.equal_norm = bool(equal_norm)
        self._grad_norm: torch.Tensor | None = None

    @property
    def alpha_mean(self) -> float:
        return float(self.alpha.float().mean())

    def _combined(self, name: str, delta: float, offset: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        value = self.grad[name]
        if delta != 0.0 and name in self.direction:
            value = value + delta * self.direction[name]
        if offset is not None and name in offset:
            value = value + offset[name]
        return value

    def _norm(self, delta: float, offset: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """The global L2 norm of ``g(alpha + delta) (+ offset)``, one parameter at a time."""
        squares = [self._combined(n, delta, offset).float().pow(2).sum() for n in self.grad]
        return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())

    def scale(
        self, delta: float = 0.0, offset: Mapping[str, torch.Tensor] | None = None, equal_norm: bool | None = None
    ) -> torch.Tensor:
        """The factor the candidate's gradient is multiplied by: ``equal_norm``'s rescaling to ``|g(alpha)|`` (None:
        the preview's own setting), then ``torch.nn.utils.clip_grad_norm_``'s rule ``min(1, max_norm / (norm +
        1e-6))``."""
        shifted = delta != 0.0 or offset is not None
        if delta != 0.0 and self.direction is None:
            raise RuntimeError("StepPreview.gradient: a shift needs the direction dg/dalpha, which was not computed")
        if not self.grad:
            return torch.ones(())
        norm = self._norm(delta, offset) if shifted else self._base_norm()
        factor = torch.ones(())
        if equal_norm is None:
            equal_norm = self.equal_norm
        if equal_norm and shifted and float(norm) > 0:
            factor = self._base_norm() / norm
            norm = self._base_norm()
        if self.max_grad_norm and self.max_grad_norm > 0:
            factor = factor * torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        return factor

    def _base_norm(self) -> torch.Tensor:
        if self._grad_norm is None:
            self._grad_norm = global_norm(self.grad)
        return self._grad_norm

    def gradient(
        self, delta: float = 0.0, offset: Mapping[str, torch.Tensor] | None = None, equal_norm: bool | None = None
    ) -> Params:
        """The candidate's gradient after ``equal_norm`` and clipping, as a dict (one tensor per parameter)."""
        return dict(_LazyGradients(self, delta, offset, equal_norm).items())

    @torch.no_grad()
    def params_at(
        self, delta: float = 0.0, offset: Mapping[str, torch.Tensor] | None = None, equal_norm: bool | None = None
    ) -> Params:
        """Every trainable parameter after the previewed step (parameters without a gradient stay). The candidate's
        gradient is built one parameter at a time as the optimiser's update reads it.

        Args:
            delta: the uniform shift of alpha (along ``direction``).
            offset: a candidate's exact gradient difference (per-sequence / per-token candidates).
            equal_norm: compare at the norm of ``g(alpha)`` (None: the preview's own ``equal_norm``).
        """
        moved = self.update(self.params, _LazyGradients(self, delta, offset, equal_norm))
        return {name: moved.get(name, theta.detach()) for name, theta in self.params.items()}


class _LazyGradients(Mapping):
    """``name -> (g + delta d + offset) * scale``, computed when read (never all at once)."""

    def __init__(
        self,
        preview: StepPreview,
        delta: float,
        offset: Mapping[str, torch.Tensor] | None,
        equal_norm: bool | None = None,
    ) -> None:
        self.preview, self.delta, self.offset = preview, float(delta), offset
        self.factor = preview.scale(self.delta, offset, equal_norm)

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.preview._combined(name, self.delta, self.offset)
        return value * self.factor.to(value.dtype) if float(self.factor) != 1.0 else value

    def __iter__(self):
        return iter(self.preview.grad)

    def __len__(self) -> int:
        return len(self.preview.grad)


class BatchScorer:
    """``D = (FKL + RKL) / 2`` per counted token of one or more batches, at given parameters (eval mode, no grad).

    Args:
        model: the unwrapped student module.
        batches: batch dicts (``input_ids``, ``attention_mask``) on the model's device.
        teacher_logits: the teacher's shifted logits ``[B, T-1, V]`` of each batch (computed once by the trainer).
        masks: the shifted counted-token masks ``[B, T-1]`` of each batch.
        alignment: ``(student_logits, teacher_logits, mask) -> per-token D [B, T-1]`` (``arkd.reward.token_alignment``
            at the run's temperature).
        from_hidden: memory-light scoring (``trainer.fused_linear``): the forward keeps the last position's logits
            only, and D is computed from the final hidden states and the output layer's (previewed) weight,
            ``chunk_rows`` counted rows of logits at a time, so no ``[B, T, V]`` student logits are built.
        chunk_rows: rows per chunk with ``from_hidden`` (None: about 2^22 logit entries per chunk).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batches: Sequence[dict[str, torch.Tensor]],
        teacher_logits: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        alignment: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        from_hidden: bool = False,
        chunk_rows: int | None = None,
    ) -> None:
        self.from_hidden = bool(from_hidden)
        self.chunk_rows = chunk_rows
        if self.from_hidden:
            layer = model.get_output_embeddings()
            names = {id(p): n for n, p in model.named_parameters()}  # the names the previews use (tied: once)
            self._weight_names = [names.get(id(layer.weight))]
            bias = getattr(layer, "bias", None)
            self._bias_name = names.get(id(bias)) if bias is not None else None
            self._layer = layer
        self.model = model
        self.inputs = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
        self.teacher_logits = list(teacher_logits)
        self.masks = list(masks)
        self.alignment = alignment
        self.forwards = 0

    @torch.no_grad()
    def __call__(self, params: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean D over the counted tokens of all batches and processes (``params=None``: the current parameters)."""
        from torch.func import functional_call

        was_training = self.model.training
        self.model.eval()
        try:
            total = torch.zeros(2, dtype=torch.float64)
            for inputs, t, m in zip(self.inputs, self.teacher_logits, self.masks):
                if self.from_hidden:
                    total += self._hidden_sums(params, inputs, t, m)
                    self.forwards += 1
                    continue
                if params is None:
                    logits = self.model(**inputs).logits
                else:
                    logits = functional_call(self.model, dict(params), args=(), kwargs=inputs).logits
                d = self.alignment(drop_last_position(logits), t, m)
                total += torch.stack([d[m].double().sum().cpu(), m.sum().double().cpu()])
                self.forwards += 1
        finally:
            self.model.train(was_training)
        total = pdist.all_reduce_sum(total)
        return float(total[0] / total[1].clamp_min(1))

    def _hidden_sums(self, params, inputs, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``[sum of D, counted tokens]`` of one batch from the final hidden states, a chunk of rows at a time."""
        from torch.func import functional_call

        kwargs = {**inputs, "output_hidden_states": True, "logits_to_keep": 1}
        if params is None:
            out = self.model(**kwargs)
        else:
            out = functional_call(self.model, dict(params), args=(), kwargs=kwargs)
        hidden = drop_last_position(out.hidden_states[-1])[m]
        weight = self._layer.weight
        bias = getattr(self._layer, "bias", None)
        if params is not None:
            weight = params.get(self._weight_names[0], weight) if self._weight_names[0] else weight
            bias = params.get(self._bias_name, bias) if self._bias_name else bias
        rows = t[m]
        step = self.chunk_rows or max(1, (1 << 22) // max(rows.shape[-1], 1))
        d_sum = torch.zeros((), dtype=torch.float64)
        for start in range(0, rows.shape[0], step):
            logits = torch.nn.functional.linear(hidden[start : start + step], weight, bias)
            d_sum += self.alignment(logits[None], rows[start : start + step][None], None).double().sum().cpu()
        return torch.stack([d_sum, m.sum().double().cpu()])


def as_params(model: torch.nn.Module) -> Params:
    """Name -> trainable parameter of ``model``."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
