"""The objective: one micro-batch in, its loss and named statistics out (:class:`StepOutput`).

``Objective(batch, teacher_logits, control)`` runs the teacher (eval mode, no grad; or a teacher source such as the
teacher cache), the student (its ``[B, T, V]`` logits, or with ``fused_linear`` its final hidden states only), the
teacher-student features the alpha strategy reads, asks the step's alpha control for alpha, and returns
``kd_weight * KD(alpha) + ce_weight * CE`` with the KD and CE sums over the counted tokens. What the loss takes
(alpha, the target ids, a schedule of its own) is read once, from its declared :class:`arkd.losses.KDLoss`
capabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from arkd import rng
from arkd.data.collate import drop_last_position, model_inputs, shift_for_next_token, shift_labels
from arkd.losses import loss_capabilities
from arkd.losses.topk import TopKTeacher
from arkd.policy.features import compute_features, compute_features_from_hidden
from arkd.step import StepOutput, kl_sums

__all__ = ["Objective", "prepare_teacher"]


class Objective:
    """Turn a micro-batch into the step's :class:`StepOutput`.

    Args:
        student: the student as trained (possibly wrapped by accelerate); ``unwrap`` gives the module.
        teacher: the prepared teacher module (eval mode, frozen), or None.
        teacher_source: ``batch -> TopKTeacher`` (the teacher cache) in place of a teacher module, or None.
        loss: the KD loss module (``reduction="sum"``), or None (plain SFT).
        kd_weight, ce_weight: the weights of the KD and cross-entropy terms.
        temperature, feature_mu: the features' options (``compute_features``); the loss's temperature.
        fused_linear: compute the KD term from the student's final hidden states and output layer
            (``loss.from_hidden``), never building the student's ``[B, T, V]`` logits with gradients.
        unwrap: ``module -> module`` (``accelerator.unwrap_model``).
        device: where the random state of the student forward is snapshot (the legacy reward replays it).
    """

    def __init__(
        self,
        *,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        teacher_source: Callable[[dict[str, torch.Tensor]], TopKTeacher] | None,
        loss: torch.nn.Module | None,
        kd_weight: float,
        ce_weight: float,
        temperature: float,
        feature_mu: float,
        fused_linear: bool,
        unwrap: Callable[[torch.nn.Module], torch.nn.Module],
        device: torch.device,
    ) -> None:
        self.student, self.teacher, self.teacher_source, self.loss = student, teacher, teacher_source, loss
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.temperature, self.feature_mu = temperature, feature_mu
        self.fused_linear, self.unwrap, self.device = fused_linear, unwrap, device
        self.caps = loss_capabilities(loss) if loss is not None else None
        self.has_teacher = teacher is not None or teacher_source is not None
        self._hidden_checked = False

    @property
    def distils(self) -> bool:
        """Whether the objective has a KD term."""
        return self.loss is not None and self.kd_weight != 0

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | TopKTeacher | None:
        """The teacher's logits ``[B, T, V]`` (eval mode, no_grad), its top-k ``[B, T, k]`` from a teacher source,
        or None without a teacher."""
        if self.teacher_source is not None:
            return self.teacher_source(batch)
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(**model_inputs(batch)).logits

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's output layer (``lm_head``): its weight ``[V, H]`` and bias (or None)."""
        layer = self.unwrap(self.student).get_output_embeddings()
        return layer.weight, getattr(layer, "bias", None)

    def kd(self, out: StepOutput, alpha: Any) -> torch.Tensor:
        """The KD term of a micro-batch, summed over counted tokens, at ``alpha`` (with its autograd graph)."""
        if self.fused_linear:
            weight, bias = self.output_layer()
            return self.loss.from_hidden(
                out.student_hidden, weight, out.teacher_logits, out.mask, bias=bias, alpha=alpha
            )
        extra: dict[str, Any] = {}
        if self.caps.takes_alpha:
            extra["alpha"] = alpha
        if self.caps.needs_target_ids:
            extra["target_ids"] = out.targets
        return self.loss(out.student_logits, out.teacher_logits, out.mask, **extra)

    def __call__(
        self,
        batch: dict[str, torch.Tensor],
        teacher_logits: torch.Tensor | TopKTeacher | None,
        control: Any,
        *,
        want_kl: bool,
    ) -> StepOutput:
        """Forward one micro-batch: the loss to backpropagate and its named statistics.

        Args:
            batch: a batch dict on the device.
            teacher_logits: the teacher's ``[B, T, V]`` logits when already computed (None: computed here).
            control: the step's alpha control (``wants_features``, ``feature_options``, ``choose(features)``).
            want_kl: compute the FKL / RKL sums for logging even without features.
        """
        if teacher_logits is None:
            teacher_logits = self.teacher_logits(batch)
        state = rng.snapshot(self.device)  # the dropout state of the student forward (the legacy reward replays it)
        targets, m = shift_labels(batch)
        s = h = None
        if self.fused_linear:
            h = drop_last_position(self._student_hidden(batch))
        else:
            s, m = shift_for_next_token(self.student(**model_inputs(batch)).logits, batch["loss_mask"].bool())
        t = drop_last_position(teacher_logits) if teacher_logits is not None else None
        loss = (s if s is not None else h).new_zeros((), dtype=torch.float32)
        out = StepOutput(loss=loss, student_logits=s, teacher_logits=t, mask=m, targets=targets, batch=batch, rng=state)
        out.student_hidden = h
        out.tokens = int(m.sum())
        if self.distils:
            if control.wants_features:
                out.features = self._features(out, batch, control.feature_options)
                out.alpha = control.choose(out.features)
            out.kd = self.kd(out, out.alpha)
            loss = loss + self.kd_weight * out.kd
            if out.features is not None:  # FKL / RKL per token are among the features already
                out.fkl, out.rkl = out.features.fkl.sum(), out.features.rkl.sum()
            elif want_kl and s is not None:
                out.fkl, out.rkl = kl_sums(s, t, m, self.temperature)
        if self.ce_weight != 0:
            if h is not None:  # the counted rows' logits only
                weight, bias = self.output_layer()
                counted = F.linear(h[m], weight, bias)
            else:
                counted = s[m]
            out.ce = F.cross_entropy(counted.float(), targets[m], reduction="sum")
            loss = loss + self.ce_weight * out.ce
        out.loss = loss
        return out

    @torch.no_grad()
    def features(self, batch: dict[str, torch.Tensor], teacher_logits: Any, options: dict[str, Any]):
        """The features of a micro-batch at the current weights, without a loss (a segment's start state)."""
        targets, m = shift_labels(batch)
        s = h = None
        if self.fused_linear:
            h = drop_last_position(self._student_hidden(batch))
        else:
            s, m = shift_for_next_token(self.student(**model_inputs(batch)).logits, batch["loss_mask"].bool())
        out = StepOutput(loss=torch.zeros(()), student_logits=s, teacher_logits=drop_last_position(teacher_logits),
                         mask=m, targets=targets, batch=batch, student_hidden=h)  # fmt: skip
        return self._features(out, batch, options)

    def _features(self, out: StepOutput, batch: dict[str, torch.Tensor], options: dict[str, Any]):
        options = {"temperature": self.temperature, "mu": self.feature_mu, **options}
        options["on_policy"] = batch.get("on_policy")
        if out.student_hidden is not None:
            weight, bias = self.output_layer()
            h, t, m = out.student_hidden, out.teacher_logits, out.mask
            return compute_features_from_hidden(h.detach(), weight.detach(), t, m, bias=bias, **options)
        return compute_features(out.student_logits.detach(), out.teacher_logits, out.mask, **options)

    def _student_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The final hidden states ``[B, T, H]`` (the output layer's input), from a forward that keeps the logits of
        the last position only; checked once against those logits."""
        out = self.student(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        if not self._hidden_checked:
            weight, bias = self.output_layer()
            with torch.no_grad():
                last = F.linear(hidden[:, -1:], weight, bias)
            same = last.shape == out.logits.shape and torch.allclose(last.float(), out.logits.float(), 1e-3, 1e-3)
            if not same:
                raise ValueError(
                    "trainer.fused_linear: this model's last hidden state is not the input of its output layer "
                    "(get_output_embeddings); expected a causal LM whose hidden_states[-1] is final-normed, as GPT-2, "
                    "Llama and Qwen2 have. Set trainer.fused_linear=false."
                )
            self._hidden_checked = True
        return hidden


def prepare_teacher(accelerator: Any, teacher: torch.nn.Module) -> torch.nn.Module:
    """Freeze the teacher (eval mode, no gradients) and place it for the run's distributed set-up.

    DDP and FSDP: the teacher is not wrapped (nothing to synchronise), only moved and put under the run's
    mixed-precision autocast (``evaluation_mode``); every process holds a full copy. DeepSpeed: the teacher gets an
    inference engine of its own with the student's ZeRO config; at stage 3 its parameters are sharded too, at
    stages 0-2 it is replicated (ZeRO only shards optimizer state and gradients, which a teacher does not have).
    """
    from accelerate.utils import DistributedType

    teacher.eval()
    teacher.requires_grad_(False)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.prepare_model(teacher, evaluation_mode=True)
    import copy

    import deepspeed

    ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)
    if stage != 3:
        ds_config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=teacher, config=ds_config)
    engine.eval()
    return engine
