"""What ``KDTrainer`` and ``ARKDGKDTrainer`` share: the KD loss of a micro-batch with arkd's losses, alpha through
:class:`arkd.policy.AlphaControl` at the points a Hugging Face ``Trainer`` exposes, the log and the checkpoints.

The Hugging Face loop calls ``training_step`` per micro-batch (forward through ``compute_loss``, then backward), then
clips the gradients, then ``optimizer.step()``. :class:`ARKDTrainerMixin` maps AlphaControl's calls onto it:

* ``control.begin(step)`` at the first micro-batch of an optimiser step; ``choose(features)`` and ``record(kd, ...)``
  in ``compute_loss``;
* ``after_gradient()`` and ``measure(next_batch)`` at the end of ``training_step`` on the window's last micro-batch
  (after its backward, **before** the Trainer clips: previews start from the unclipped gradient and apply
  ``args.max_grad_norm`` themselves, as the Trainer will);
* ``after_step()`` from a callback's ``on_optimizer_step`` (after ``optimizer.step()``).

The paired reward and the probe score the *next* training batch: ``get_batch_samples`` (where the Trainer draws a
window's micro-batches) draws one batch more and hands it back first at the next call, so the data order, the
number of batches and ``num_items_in_batch`` are unchanged; only the steps that measure run the teacher on it. At the
last window of an epoch there is no next batch and the step's own last micro-batch is scored instead (the
``held_out: same`` variant for that step), with the teacher logits it already has.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from arkd import rng
from arkd.losses import BidirectionalKLLoss, loss_capabilities, truncate_to_common_vocab
from arkd.policy import AlphaControl, ConstantAlpha, CosineSchedule, LinearSchedule
from arkd.policy.features import compute_features, compute_features_from_hidden
from arkd.step import kl_sums

STATE_FILE = "arkd_alpha_state.pt"
"""The file, in each Trainer checkpoint directory, that holds the strategy's, probe's and loss's state."""

IGNORE_INDEX = -100

_FEATURELESS = (ConstantAlpha, LinearSchedule, CosineSchedule)  # select reads only the progress and the device


def resolve_alpha(alpha: Any, reward: Any, probe: Any, takes_alpha: bool, loss_name: str):
    """``(strategy, reward, probe)`` from the trainer's ``alpha=``, ``reward=`` and ``probe=`` arguments."""
    from arkd.reward import PairedReward

    if isinstance(alpha, AlphaControl):
        if reward is not None or probe is not None:
            raise ValueError("give reward= and probe= inside the AlphaControl passed as alpha=, not beside it.")
        strategy, reward, probe = alpha.strategy, alpha.reward, alpha.probe
    elif alpha is None:
        strategy = ConstantAlpha(alpha=0.5) if takes_alpha else None
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        strategy = ConstantAlpha(alpha=float(alpha))
    elif callable(getattr(alpha, "select", None)) and hasattr(alpha, "needs_reward"):
        strategy = alpha
    else:
        raise TypeError(
            f"alpha must be a number in [0, 1], an arkd alpha strategy or an arkd.policy.AlphaControl, got "
            f"{type(alpha).__name__}."
        )
    if strategy is not None and not takes_alpha:
        raise ValueError(
            f"{loss_name} takes no alpha, so alpha= would change nothing: drop alpha= (and reward=, probe=) or use a "
            "loss that takes alpha (arkd.losses.BidirectionalKLLoss)."
        )
    if strategy is None and (reward is not None or probe is not None):
        raise ValueError("reward= and probe= need an alpha strategy: give alpha= as well.")
    if strategy is not None and strategy.needs_reward and reward is None:
        reward = PairedReward()
    if reward is not None and reward.branches:
        raise ValueError(
            f"reward={type(reward).__name__} trains whole branches from in-memory snapshots, which arkd's own loop "
            "(arkd-train, arkd.trainer.Trainer) runs and the HF Trainer's does not: use reward=PairedReward() here."
        )
    return strategy, reward, probe


def summing(loss: torch.nn.Module) -> torch.nn.Module:
    """The loss with ``reduction="sum"`` (a shallow copy when it had another reduction): the trainers normalise."""
    if getattr(loss, "reduction", "sum") == "sum":
        return loss
    loss = copy.copy(loss)
    loss.reduction = "sum"
    return loss


class ARKDTrainerMixin:
    """The arkd part of a ``transformers.Trainer`` subclass (put it first in the bases). See the module docstring."""

    # ------------------------------------------------------------------------------------------------- set-up

    # The Trainer's own hooks, the same for every subclass (the mixin stands before the Trainer in its bases, so
    # super() is the Trainer's)
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return self._arkd_get_batch_samples(super().get_batch_samples, epoch_iterator, num_batches, device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        self._arkd_merge_logs(logs)
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        self._arkd_save(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._arkd_load(resume_from_checkpoint)

    def _arkd_init(
        self,
        *,
        loss: torch.nn.Module | None,
        alpha: Any,
        reward: Any,
        probe: Any,
        kd_weight: float,
        ce_weight: float,
        fused_linear: bool | None,
    ) -> None:
        from transformers import TrainerCallback

        loss = BidirectionalKLLoss() if loss is None else loss
        if not isinstance(loss, torch.nn.Module):
            raise TypeError(f"loss must be an arkd loss module (torch.nn.Module), got {type(loss).__name__}.")
        self.kd_caps = loss_capabilities(loss)
        for name, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if kd_weight == 0 and ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing to train.")
        if fused_linear not in (None, True, False):
            raise ValueError(f"fused_linear must be None (automatic), True or False, got {fused_linear!r}.")
        if fused_linear and not callable(getattr(loss, "from_hidden", None)):
            raise ValueError(
                f"fused_linear=True computes the loss from hidden states, which {type(loss).__name__} cannot: use "
                "BidirectionalKLLoss or GeneralizedJSDLoss, or fused_linear=None."
            )
        self.kd_loss = summing(loss).to(self.args.device)
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        strategy, reward, probe = resolve_alpha(alpha, reward, probe, self.kd_caps.takes_alpha, type(loss).__name__)
        self.alpha_strategy, self.alpha_reward, self.alpha_probe = strategy, reward, probe
        self.alpha_temperature = float(getattr(loss, "temperature", 1.0))
        self._arkd_given_control = alpha if isinstance(alpha, AlphaControl) else None
        if self._arkd_given_control is not None:  # its temperature: the features' and the rewards'
            self.alpha_temperature = float(alpha.temperature)
        if reward is not None and reward.needs_student_logits and fused_linear:
            raise ValueError(
                "reward=SameBatchReward compares the student's logits before and after a step, which fused_linear=True "
                "never builds: use PairedReward or fused_linear=None."
            )
        self._arkd_fused_request = fused_linear
        self._arkd_fused: bool | None = False if fused_linear is False else None  # decided at the first forward
        self.alpha_control: AlphaControl | None = None  # built at the first training step (it needs the optimizer)
        self._arkd_check_supported()
        self._arkd_ctl = None
        self._arkd_sums: dict[str, float] = defaultdict(float)
        self._arkd_logs: dict[str, list[float]] = defaultdict(list)
        self._arkd_stash: tuple[Any, Any] | None = None
        self._arkd_next: Any = None
        self._arkd_row: dict[str, Any] = {}
        self._arkd_on_policy = False
        self._arkd_last_alpha = None
        self._arkd_loaded_from: str | None = None
        self._arkd_last_teacher: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None

        trainer = self

        class _AfterOptimizerStep(TrainerCallback):
            def on_optimizer_step(self, args, state, control, **kwargs):
                trainer._arkd_after_step()

        self.add_callback(_AfterOptimizerStep())

    @property
    def _arkd_previews(self) -> bool:
        s = self.alpha_strategy
        if s is None:
            return False
        paired = s.needs_reward and self.alpha_reward is not None and int(self.alpha_reward.candidates) >= 2
        return paired or self.alpha_probe is not None or s.chooses_after_gradient

    @property
    def _arkd_peeks(self) -> bool:
        """Whether a measurement scores the next training batch (the probe, or a paired reward held out on it)."""
        if not self._arkd_previews:
            return False
        held_out = getattr(self.alpha_reward, "held_out", "same")
        return self.alpha_probe is not None or (self.alpha_strategy.needs_reward and held_out == "next")

    def _arkd_check_supported(self) -> None:
        """Refuse, in one sentence, what the previews (paired reward, probe, greedy) cannot do here."""
        if not self._arkd_previews:
            return
        what = "a paired reward, the alpha-signal probe or greedy search"
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                f"{what} previews the optimiser step from the full parameters and plain gradients, which DeepSpeed "
                "(ZeRO) shards or owns: use a strategy without previews (a constant, a schedule, AKL, ToDi) or no "
                "DeepSpeed."
            )
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                f"{what} previews the optimiser step from the full parameters, which FSDP shards: use a strategy "
                "without previews or no FSDP."
            )
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise ValueError(
                f"{what} inside a Hugging Face Trainer runs on one process here (multi-process previews are not "
                "implemented in arkd.integrations): run arkd-train for them, or use a strategy without previews."
            )
        if getattr(self.args, "fp16", False):
            raise ValueError(
                f"{what} reads plain gradients, and fp16 training scales them: use bf16 or fp32 with previews."
            )

    # ---------------------------------------------------------------------------------------- the control
    def _arkd_control(self, model: torch.nn.Module) -> AlphaControl | None:
        if self.alpha_strategy is None:
            return None
        if self.alpha_control is None and self._arkd_given_control is not None:  # bound to this Trainer's parts
            control = self._arkd_given_control
            control.model, control.optimizer = self.accelerator.unwrap_model(model), self.optimizer
            control.max_steps = max(int(self.state.max_steps), 1)
            control.max_grad_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else None
            control.from_hidden = bool(self._arkd_fused)
            self.alpha_control = control
        if self.alpha_control is None:
            grad_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
            self.alpha_control = AlphaControl(
                self.alpha_strategy, reward=self.alpha_reward, probe=self.alpha_probe,
                model=self.accelerator.unwrap_model(model), optimizer=self.optimizer,
                max_steps=max(int(self.state.max_steps), 1), max_grad_norm=grad_norm,
                temperature=self.alpha_temperature, from_hidden=bool(self._arkd_fused),
            )  # fmt: skip
        return self.alpha_control

    def _arkd_teacher(self) -> torch.nn.Module:
        raise NotImplementedError

    def _arkd_teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        teacher = self._arkd_teacher()
        teacher.eval()
        with torch.no_grad():
            return teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits

    def _arkd_scale(self, num_items_in_batch: Any) -> float:
        """The factor the Trainer applies to the loss ``compute_loss`` returns before its backward (1, or one over
        the accumulation steps when the loss is not normalised for gradient accumulation)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return 1.0 if scaled else 1.0 / max(int(getattr(self, "current_gradient_accumulation_steps", 1)), 1)

    # ------------------------------------------------------------------------------------ the step's loss
    def _arkd_use_fused(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
        """Whether to compute the KD term from hidden states: decided (and checked) once, at the first forward."""
        if self._arkd_fused is not None:
            return self._arkd_fused
        request = self._arkd_fused_request
        module = self.accelerator.unwrap_model(model)
        fits = (
            callable(getattr(self.kd_loss, "from_hidden", None))
            and callable(getattr(module, "get_output_embeddings", None))
            and module.get_output_embeddings() is not None
            and not (self.alpha_reward is not None and self.alpha_reward.needs_student_logits)
            and not getattr(self, "is_deepspeed_enabled", False)
            and "logits_to_keep" in inspect.signature(module.forward).parameters  # else it would build them anyway
        )
        if fits:  # the forward's dropout must not move the random state the training forward will use
            devices = [ids_device] if (ids_device := inputs["input_ids"].device).type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                ids = inputs["input_ids"][:1]
                out = model(input_ids=ids, attention_mask=_first(inputs.get("attention_mask")),
                            output_hidden_states=True)  # fmt: skip
                layer = module.get_output_embeddings()
                again = F.linear(out.hidden_states[-1], layer.weight, getattr(layer, "bias", None))
                fits = again.shape == out.logits.shape and torch.allclose(
                    again.float(), out.logits.float(), rtol=1e-3, atol=1e-3
                )
        if request and not fits:
            raise ValueError(
                "fused_linear=True: this model's forward takes no logits_to_keep or its last hidden state is not the "
                "input of its output layer (get_output_embeddings), or the set-up (DeepSpeed, a reward that needs the "
                "student's logits) keeps the logits; use fused_linear=None."
            )
        self._arkd_fused = bool(fits)
        if self.alpha_control is not None:
            self.alpha_control.from_hidden = self._arkd_fused
        return self._arkd_fused

    def _arkd_output_layer(self, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = self.accelerator.unwrap_model(model).get_output_embeddings()
        return layer.weight, getattr(layer, "bias", None)

    def _arkd_compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool, num_items_in_batch: Any
    ):
        """``kd_weight * KD_sum + ce_weight * CE_sum`` over the counted tokens (``labels != -100`` after the
        next-token shift), divided by ``num_items_in_batch`` when the Trainer gives it, else by the micro-batch's
        counted tokens (TRL's ``generalized_jsd_loss`` normalisation)."""
        labels = inputs["labels"]
        ids, attention = inputs["input_ids"], inputs.get("attention_mask")
        training = model.training and not return_outputs
        fused = training and self._arkd_use_fused(model, inputs)
        state = rng.snapshot(ids.device)
        if fused:
            outputs = model(input_ids=ids, attention_mask=attention, output_hidden_states=True, logits_to_keep=1)
            h, s = outputs.hidden_states[-1][:, :-1], None
        else:
            outputs = model(input_ids=ids, attention_mask=attention)
            h, s = None, outputs.logits[:, :-1]
        t_full = self._arkd_teacher_logits({"input_ids": ids, "attention_mask": attention})
        t = t_full[:, :-1]
        if s is not None and s.shape[-1] != t.shape[-1]:
            s, t = truncate_to_common_vocab(s, t)
        weight = bias = None
        if fused:
            weight, bias = self._arkd_output_layer(model)
            v = min(weight.shape[0], t.shape[-1])
            weight, t = weight[:v], t[..., :v]
            bias = None if bias is None else bias[:v]
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        tokens = mask.sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else tokens.clamp_min(1)
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(ids.device)

        ctl = self._arkd_ctl if training else None
        control = self.alpha_control if training else None
        alpha, features = None, None
        if self.kd_caps.takes_alpha:
            if ctl is not None:
                if isinstance(self.alpha_strategy, _FEATURELESS):
                    features = SimpleNamespace(device=ids.device)
                else:
                    options = {"temperature": self.alpha_temperature, **control.feature_options}
                    options["on_policy"] = inputs.get("on_policy")
                    if fused:
                        features = compute_features_from_hidden(h.detach(), weight.detach(), t, mask, bias=bias,
                                                                **options)  # fmt: skip
                    else:
                        features = compute_features(s.detach(), t, mask, **options)
                alpha = ctl.choose(features)
                self._arkd_last_alpha = alpha
            else:
                alpha = self._arkd_eval_alpha()

        def kd(a):
            extra: dict[str, Any] = {}
            if fused:
                return self.kd_loss.from_hidden(h, weight, t, mask, bias=bias,
                                                **({"alpha": a} if self.kd_caps.takes_alpha else {}))  # fmt: skip
            if self.kd_caps.takes_alpha:
                extra["alpha"] = a
            if self.kd_caps.needs_target_ids:
                extra["target_ids"] = targets
            return self.kd_loss(s, t, mask, **extra)

        total = torch.zeros((), dtype=torch.float32, device=ids.device)
        kd_sum = ce_sum = None
        if self.kd_weight:
            kd_sum = kd(alpha)
            total = total + self.kd_weight * kd_sum
        if self.ce_weight:
            counted = F.linear(h[mask], weight, bias) if fused else s[mask]
            ce_sum = F.cross_entropy(counted.float(), targets[mask], reduction="sum")
            total = total + self.ce_weight * ce_sum
        loss = total / denominator * self._arkd_process_scale(num_items_in_batch)

        if training:
            sums = self._arkd_sums
            sums["tokens"] += float(tokens)
            if kd_sum is not None:
                sums["kd"] += float(kd_sum.detach())
            if ce_sum is not None:
                sums["ce"] += float(ce_sum.detach())
            if features is not None and hasattr(features, "fkl"):
                sums["fkl"] += float(features.fkl.sum())
                sums["rkl"] += float(features.rkl.sum())
            elif self._arkd_log_now():
                fkl, rkl = self._arkd_kl_sums(s, h, weight, bias, t, mask)
                sums["fkl"] += fkl
                sums["rkl"] += rkl
            if ctl is not None:
                batch = {"input_ids": ids, "attention_mask": _ones_if_none(attention, ids), "loss_mask": labels != -100}
                self._arkd_last_teacher = (batch, t_full)  # the control's record keeps a view of it anyway
                scale = self.kd_weight * self._arkd_scale(num_items_in_batch) / float(denominator)
                scale *= self._arkd_process_scale(num_items_in_batch)
                ctl.record(
                    kd if self.kd_weight else None, alpha=alpha, batch=batch, teacher_logits=t, mask=mask,
                    scale=scale, student_logits=s, rng=state,
                    features=features if hasattr(features, "fkl") else None,
                )  # fmt: skip
        return (loss, outputs) if return_outputs else loss

    def _arkd_process_scale(self, num_items_in_batch: Any) -> float:
        """A factor on the normalised loss for several processes (1 here: TRL's GKD applies none)."""
        return 1.0

    def _arkd_eval_alpha(self):
        if self._arkd_last_alpha is not None and self._arkd_last_alpha.dim() == 0:
            return self._arkd_last_alpha
        strategy = self.alpha_strategy
        return float(getattr(strategy, "alpha", 0.5)) if strategy is not None else 0.5

    def _arkd_log_now(self) -> bool:
        steps = int(getattr(self.state, "logging_steps", 0) or 0)
        step = self.state.global_step + 1
        first = bool(getattr(self.args, "logging_first_step", False)) and step == 1
        return first or (steps > 0 and step % steps == 0) or step >= int(self.state.max_steps or 0)

    @torch.no_grad()
    def _arkd_kl_sums(self, s, h, weight, bias, t, mask) -> tuple[float, float]:
        if s is not None:
            fkl, rkl = kl_sums(s, t, mask, self.alpha_temperature)
            return float(fkl), float(rkl)
        f = compute_features_from_hidden(h.detach(), weight.detach(), t, mask, bias=bias,
                                         temperature=self.alpha_temperature)  # fmt: skip
        return float(f.fkl.sum()), float(f.rkl.sum())

    # ------------------------------------------------------------------- the Trainer's step, micro-batch by micro-batch
    def _arkd_training_step(self, step_fn, model, inputs, num_items_in_batch):
        """``training_step``: begin the optimiser step at its first micro-batch; after the last one's backward (the
        window's gradient, before clipping), the previews' ``after_gradient`` and ``measure``."""
        if self._arkd_ctl is None:
            control = self._arkd_control(model)
            self._arkd_ctl = control.begin(self.state.global_step) if control is not None else None
            self._arkd_sums = defaultdict(float)
            self._arkd_row = {}
        loss = step_fn(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            ctl = self._arkd_ctl
            if ctl is not None:
                ctl.after_gradient()
                if math.isfinite(self._arkd_sums.get("kd", 0.0)):
                    self._arkd_row.update(ctl.measure(self._arkd_held_out))
                else:  # a non-finite loss: nothing a preview could learn from
                    self._arkd_row["reward_skipped"] = 1.0
        return loss

    def _arkd_held_out(self):
        """``(batch, teacher logits)`` of the next training batch (or, at an epoch's end, the step's own)."""
        raw = self._arkd_next if self._arkd_peeks else None
        if raw is None:
            if self._arkd_peeks:  # the last window of an epoch: no next batch
                self._arkd_row["held_out_same"] = 1.0
            return self._arkd_last_teacher  # the step's last micro-batch, its teacher logits already computed
        batch = self._prepare_inputs(dict(raw))
        ids = batch["input_ids"]
        held = {"input_ids": ids, "attention_mask": _ones_if_none(batch.get("attention_mask"), ids),
                "loss_mask": batch["labels"] != IGNORE_INDEX}  # fmt: skip
        return held, self._arkd_teacher_logits(held)

    def _arkd_after_step(self) -> None:
        """After ``optimizer.step()``: the legacy same-batch reward, the loss's own schedule, the step's log row."""
        ctl, self._arkd_ctl = self._arkd_ctl, None
        sums, row = self._arkd_sums, self._arkd_row
        if ctl is not None:
            row.update(ctl.after_step())
            row.update(ctl.alpha_row())
        tokens = max(sums.get("tokens", 0.0), 1.0)
        if "kd" in sums:
            row["kd"] = sums["kd"] / tokens
            if self.kd_caps.has_schedule and math.isfinite(row["kd"]):
                self.kd_loss.update(row["kd"])
        if "fkl" in sums:
            row["fkl"], row["rkl"] = sums["fkl"] / tokens, sums["rkl"] / tokens
        if "ce" in sums:
            row["ce"] = sums["ce"] / tokens
        if ctl is not None:
            row = self.alpha_control.merge_log({"step": self.state.global_step + 1, **row})
            row.pop("step", None)
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value is None:
                continue
            self._arkd_logs[_log_name(key)].append(float(value))

    def _arkd_merge_logs(self, logs: dict[str, float]) -> None:
        """Add the steps' arkd statistics (means since the last log) to a training log."""
        if not self._arkd_logs or not any(k == "loss" or k.startswith("train_") for k in logs):
            return
        for key, values in self._arkd_logs.items():
            finite = [v for v in values if math.isfinite(v)]
            logs[key] = sum(finite) / len(finite) if finite else (values[-1] if values else float("nan"))
        self._arkd_logs = defaultdict(list)

    # ------------------------------------------------------------------------------- the next batch, for the previews
    def _arkd_get_batch_samples(self, draw, epoch_iterator, num_batches, device):
        """The Trainer's ``get_batch_samples`` with one batch of look-ahead when a preview scores the next batch."""
        if not self._arkd_peeks:
            return draw(epoch_iterator, num_batches, device)
        stash, self._arkd_stash = self._arkd_stash, None
        pending = [stash[1]] if stash is not None and stash[0] is epoch_iterator else []
        batches, num_items = draw(_Prepend(pending, epoch_iterator), num_batches, device)
        try:
            following = next(epoch_iterator)
        except StopIteration:
            following = None
        self._arkd_next = following
        if following is not None:
            self._arkd_stash = (epoch_iterator, following)
        return batches, num_items

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _arkd_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"format": 1}
        if self.alpha_strategy is not None:
            state["strategy"] = self.alpha_strategy.state_dict()
        if self.alpha_probe is not None:
            state["probe"] = self.alpha_probe.state_dict()
        if self.kd_caps.has_schedule:
            state["loss"] = self.kd_loss.state_dict()
        return state

    def _arkd_save(self, trial: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if os.path.isdir(folder):
            torch.save(self._arkd_state(), os.path.join(folder, STATE_FILE))

    def _arkd_load(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if self._arkd_loaded_from == checkpoint:
            return
        if not os.path.isfile(path):
            if self.alpha_strategy is not None and self.alpha_strategy.state_dict():
                raise FileNotFoundError(
                    f"{checkpoint} has no {STATE_FILE}: it was not written by an arkd trainer, so the alpha "
                    "strategy's state cannot be restored."
                )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if self.alpha_strategy is not None and "strategy" in state:
            self.alpha_strategy.load_state_dict(state["strategy"])
        if self.alpha_probe is not None and "probe" in state:
            self.alpha_probe.load_state_dict(state["probe"])
        if self.kd_caps.has_schedule and "loss" in state:
            self.kd_loss.load_state_dict(state["loss"])
        self._arkd_loaded_from = checkpoint


class _Prepend:
    """An iterator that yields ``first`` then the rest of ``iterator``."""

    def __init__(self, first: list, iterator) -> None:
        self.first, self.iterator = list(first), iterator

    def __iter__(self):
        return self

    def __next__(self):
        if self.first:
            return self.first.pop(0)
        return next(self.iterator)


def _first(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x[:1]


def _ones_if_none(attention: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids) if attention is None else attention


_NAMES = {"alpha_mean": "alpha", "kd": "kd_loss"}


def _log_name(key: str) -> str:
    return _NAMES.get(key, key)
