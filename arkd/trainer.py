"""The distillation loop on accelerate: one optimiser step after the other, readable top to bottom.

It receives built objects and hands each job to its own room: :class:`arkd.window.Window` draws the accumulation
window (the rollout applied, a peeked batch reused) and counts its tokens; :class:`arkd.objective.Objective` turns a
micro-batch into its loss and statistics; :class:`arkd.policy.control.AlphaControl` is everything about alpha (the
decision, previews, greedy's search, the paired reward and the probe, the legacy reward); :mod:`arkd.branching` runs
the horizon reward's and probe's branches; :class:`arkd.validation.Validator` validates; :mod:`arkd.checkpoint`
writes checkpoints and publishes ``best/`` and ``final/``. :meth:`Trainer.train_step` is the numbered step,
:meth:`Trainer.fit` the loop; what a checkpoint holds is listed in :meth:`Trainer.checkpoint_state`.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from arkd import branching, rng
from arkd import checkpoint as ckpt
from arkd import distributed as pdist
from arkd.branching import Branches
from arkd.compat import check_branches, check_parts, check_previews, check_rollout
from arkd.data.stream import BatchStream
from arkd.errors import NonFiniteLossError, RunFailedError, TrainingInterrupted
from arkd.losses.topk import TopKTeacher
from arkd.objective import Objective, prepare_teacher
from arkd.policy.control import AlphaControl
from arkd.policy.lookahead import as_params, global_norm
from arkd.progress import progress_bar
from arkd.run_log import MetricsLogger
from arkd.signals import StopSignals
from arkd.step import StepOutput, WindowSums
from arkd.trainer_config import TrainerConfig, TrainState
from arkd.validation import Validator
from arkd.window import Window

__all__ = [
    "BatchStream",
    "NonFiniteLossError",
    "RunFailedError",
    "StepOutput",
    "Trainer",
    "TrainerConfig",
    "TrainState",
    "TrainingInterrupted",
    "prepare_teacher",
]

# --------------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Distil (or fine-tune) a student with an alpha strategy on accelerate.

    Args:
        student: the student (a causal LM returning ``.logits``); prepared here.
        teacher: the teacher (frozen here), a teacher source ``batch -> arkd.losses.TopKTeacher`` (the teacher cache,
            whose top-k log-probabilities replace the teacher's logits everywhere), or None for plain SFT.
        tokenizer: saved next to the final and best models.
        batches: a :class:`BatchStream` (or any iterator of batch dicts with ``state_dict``/``load_state_dict``).
        strategy: an ``arkd.policy.AlphaStrategy`` (None for plain SFT or a loss that takes no alpha).
        loss: the KD loss module, ``reduction="sum"`` (None for plain SFT).
        optimizer, scheduler: the student's optimizer and a schedule stepped once per optimizer step (or None).
        accelerator: an ``accelerate.Accelerator``.
        config: a :class:`TrainerConfig`.
        reward: the reward the strategy learns from (``arkd.reward``); needed when ``strategy.needs_reward``.
        probe: an ``arkd.policy.AlphaSignalProbe`` (None: no probe).
        validation_batches, validation_examples: validation loss batches (sharded over processes here) and examples
            (with ``references``) for Rouge-L.
        predict_fn: ``(model, examples) -> list[str]``, one generation per example; under several processes every
            process gets all the generations (``arkd.evaluation.sharding.generate_sharded``).
        score_fn: ``(predictions, references) -> float``: Rouge-L x 100.
        logger: a :class:`MetricsLogger` (None: one in ``output_dir`` on the main process).
        rollout: an ``arkd.rollout.RolloutSource`` turning each dataset batch into the batch trained on (None: the
            dataset's responses).
        reward_batches: the reward split (rows no step trains on) that the horizon reward and the horizon probe score
            their branches on (sharded over processes).
    """

    def __init__(
        self,
        *,
        student: torch.nn.Module,
        teacher: torch.nn.Module | Callable[[dict[str, torch.Tensor]], TopKTeacher] | None,
        tokenizer: Any,
        batches: Any,
        strategy: Any,
        loss: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        accelerator: Any,
        config: TrainerConfig,
        reward: Any = None,
        probe: Any = None,
        validation_batches: list[dict[str, torch.Tensor]] | None = None,
        validation_examples: Sequence[Any] | None = None,
        predict_fn: Callable[[torch.nn.Module, Sequence[Any]], list[str]] | None = None,
        score_fn: Callable[[list[str], list[list[str]]], float] | None = None,
        logger: MetricsLogger | None = None,
        rollout: Any = None,
        reward_batches: list[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.cfg, self.accelerator, self.tokenizer, self.batches = config, accelerator, tokenizer, batches
        teacher_source = None if teacher is None or isinstance(teacher, torch.nn.Module) else teacher
        needs_logits = strategy is not None and reward is not None and bool(reward.needs_student_logits)
        check_parts(loss=loss, teacher=teacher is not None, topk_teacher=teacher_source is not None,
                    kd_weight=config.kd_weight, ce_weight=config.ce_weight, fused_linear=config.fused_linear,
                    reward_needs_student_logits=needs_logits)  # fmt: skip
        self.loss = loss.to(accelerator.device) if loss is not None else None
        self.run_dir, self.state, self.is_main = Path(config.output_dir), TrainState(), accelerator.is_main_process

        # The student trains; the teacher is frozen, in eval mode, and only ever runs under no_grad.
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.scheduler, engine = scheduler, accelerator.distributed_type.value
        self.teacher = prepare_teacher(accelerator, teacher) if teacher_source is None and teacher is not None else None
        self.logger = logger or MetricsLogger(self.run_dir, enabled=self.is_main)
        accelerator.gradient_accumulation_steps = config.grad_accum
        self.control = AlphaControl(
            strategy, reward=reward, probe=probe, model=accelerator.unwrap_model(self.student),
            optimizer=self.optimizer, max_steps=config.max_steps, max_grad_norm=config.max_grad_norm,
            temperature=config.temperature, from_hidden=config.fused_linear,
        )  # fmt: skip
        self.objective = Objective(
            student=self.student, teacher=self.teacher, teacher_source=teacher_source, loss=self.loss,
            kd_weight=config.kd_weight, ce_weight=config.ce_weight, temperature=config.temperature,
            feature_mu=config.feature_mu, fused_linear=config.fused_linear, unwrap=accelerator.unwrap_model,
            device=accelerator.device,
        )  # fmt: skip
        self.validator = Validator(
            batches=validation_batches, examples=validation_examples, predict_fn=predict_fn, score_fn=score_fn,
            teacher_logits=self.objective.teacher_logits if self.objective.has_teacher else None,
            temperature=config.temperature, best_metric=config.best_metric, best_mode=config.best_mode,
        )  # fmt: skip
        self.window = Window(batches, rollout, self.objective.teacher_logits, accelerator,
                             grad_accum=config.grad_accum, max_steps=config.max_steps)  # fmt: skip
        check_rollout(self.window.rollout, engine=engine, topk_teacher=teacher_source is not None,
                      validates=bool(self.validator.batches) and config.eval_interval > 0)  # fmt: skip
        self.rollout = self.window.bind_rollout(student=self.student, teacher=self.teacher, tokenizer=tokenizer)
        self.branches = self._counterfactuals(list(reward_batches or []), engine)

    def _counterfactuals(self, reward_batches: list[dict[str, torch.Tensor]], engine: str) -> Branches:
        """Checks for the step previews, and the branches of the horizon reward and probe (scored on
        ``reward_batches``)."""
        acc, control = self.accelerator, self.control
        if control.previews:
            check_previews(engine=engine, fp16_scaler=acc.scaler is not None)
        check_branches(control, reward_rows=len(reward_batches), engine=engine)
        return Branches(
            control, snapshot=self.snapshot, restore=self.restore, train_step=self.train_step,
            score=branching.reward_score(reward_batches, self.objective, control, acc),
            features=branching.next_features(self.window, self.objective, control), max_steps=self.cfg.max_steps,
            **(control.probe.horizon_options() if control.probe is not None else {}),
        )  # fmt: skip

    @property
    def strategy(self) -> Any:
        return self.control.strategy

    @property
    def rollout_seconds_total(self) -> float:  # generation time of this run's steps (the recipe's summary)
        return self.window.generation_seconds

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints: what one holds is listed here, in one place

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the weights and the per-process random and rollout states."""
        acc = self.accelerator
        return {
            "train": self.state.state_dict(),  # step, skipped steps, tokens seen, best value and step
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "strategy": self.strategy.state_dict() if self.strategy is not None else None,  # the policy, its RNG
            "probe": self.control.probe.state_dict() if self.control.probe is not None else None,
            "loss": self.loss.state_dict() if self.loss is not None else None,  # a loss's own schedule (TAID)
            "data": self.batches.state_dict(),  # the position before a peeked batch
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "world_size": acc.num_processes,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state` (older checkpoints may lack the later keys)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.strategy is not None and state["strategy"] is not None:
            self.strategy.load_state_dict(state["strategy"])
        if self.control.probe is not None and state.get("probe"):
            self.control.probe.load_state_dict(state["probe"])
        if self.loss is not None and state.get("loss"):
            self.loss.load_state_dict(state["loss"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_XXXXXXX/`` atomically (every process takes part; the main one writes)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        healthy = (
            self.weights_finite()
            and self.state.skipped_steps / max(self.state.step, 1) <= self.cfg.max_skipped_fraction
        )
        model_state = acc.get_state_dict(self.student)
        rng_states = pdist.gather_objects(rng.capture())
        rollout_states = pdist.gather_objects(self.rollout.state_dict())  # one per process (its own buffer)
        path = None
        if self.is_main:
            config_file = self.run_dir / "config.yaml"
            config_text = config_file.read_text() if config_file.is_file() else None
            state = {**self.checkpoint_state(), "rollout": rollout_states}
            path = ckpt.write_checkpoint(
                self.run_dir / "checkpoints", self.state.step, model_state=model_state, state=state,
                rng_states=rng_states, keep_last=self.cfg.keep_last, healthy=healthy, config_text=config_text,
            )  # fmt: skip
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything saved by :meth:`save_checkpoint` (on every process); a checkpoint that fails its
        manifest or cannot be read raises :class:`arkd.checkpoint.CheckpointError` (one sentence)."""
        ckpt.load_verified(Path(path), self._load_checkpoint)

    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        acc.unwrap_model(self.student).load_state_dict(ckpt.load_weights(path / ckpt.MODEL_FILE), strict=True)
        state = ckpt.read_state(path)
        fresh = ckpt.optimizer_hyperparameters(self.optimizer)  # the config's, which an accepted change may have set
        self._restore(state)
        ckpt.apply_hyperparameters(self.optimizer, self.scheduler, fresh)
        rollout = state.get("rollout")
        if rollout is not None:
            if len(rollout) != acc.num_processes:
                raise ValueError(
                    f"the checkpoint holds the rollout state of {len(rollout)} process(es), this run has "
                    f"{acc.num_processes}; resume with the same number of processes"
                )
            self.rollout.load_state_dict(rollout[acc.process_index])
        self.state.load_state_dict(state["train"])
        saved = ckpt.read_rng_state(path, acc.process_index)
        if saved is not None:
            rng.restore(saved)

    def weights_finite(self) -> bool:
        """Whether the student is healthy on every process (a collective): every parameter finite and its outputs on a
        probe input finite (:func:`arkd.checkpoint.model_problem`)."""
        return ckpt.weights_finite(self.accelerator.unwrap_model(self.student), self.accelerator)

    def _unhealthy(self) -> str | None:
        """What is not finite about the student (``weights``, ``outputs on a probe input``), or None (a collective)."""
        if self.weights_finite():
            return None
        return (
            "weights"
            if ckpt.weights_problem(self.accelerator.unwrap_model(self.student))
            else "outputs on a probe input"
        )

    def _save_model(self, name: str) -> bool:
        """``save_pretrained`` the student and the tokenizer to ``run_dir/name`` (atomically, main process), only
        when every weight is finite; returns whether it was written."""
        acc = self.accelerator
        if not self.weights_finite():
            return False
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.student)
        if self.is_main:

            def save(directory: Path) -> None:
                acc.unwrap_model(self.student).save_pretrained(directory, state_dict=state)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(directory)

            ckpt.publish_model(save, self.run_dir / name)
        acc.wait_for_everyone()
        return True

    def snapshot(self, with_strategy: bool = False) -> dict[str, Any]:
        """Everything a branch restarts from, copied in memory (the checkpoint's contents; the strategy's only when
        asked: a horizon reward's policy learns across its branches)."""
        state = branching.state_copy(self.checkpoint_state())
        if not with_strategy:
            state["strategy"] = None
        model = self.accelerator.unwrap_model(self.student)
        weights = branching.state_copy(model.state_dict())
        return {"weights": weights, "state": state, "rollout": branching.state_copy(self.rollout.state_dict()),
                "rng": rng.capture()}  # fmt: skip

    def restore(self, snap: dict[str, Any]) -> None:
        """Put the run back to a :meth:`snapshot` (the peeked batch is drawn again)."""
        self.accelerator.unwrap_model(self.student).load_state_dict(snap["weights"])
        self._restore(branching.state_copy(snap["state"]))
        self.rollout.load_state_dict(branching.state_copy(snap["rollout"]))
        self.state.load_state_dict(dict(snap["state"]["train"]))
        self.window.reset()
        rng.restore(snap["rng"])

    # ----------------------------------------------------------------------------------------------------------------
    # The step

    def validate(self) -> dict[str, float]:
        """Validation loss (cross-entropy per response token; FKL / RKL when there is a teacher) and Rouge-L."""
        return self.validator.validate(self.student, self.accelerator)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over one accumulation window; returns the statistics to log."""
        acc, cfg, step, started = self.accelerator, self.cfg, self.state.step, time.perf_counter()
        # accelerate syncs gradients (DDP) and lets the optimizer step on the window's last micro-batch only.
        acc.gradient_accumulation_steps, acc.step = cfg.grad_accum, 0
        ctl = self.control.begin(step)  # what is due this step: a reward, the probe, greedy's search

        # 1. The window and its counted tokens N (all micro-batches and processes). Each process backpropagates sum / N;
        # DDP's mean over processes and accelerate's over grad_accum are multiplied back: the exact token mean.
        window = self.window.draw(step)
        tokens, padding_share = self.window.counts(window)
        scale = acc.num_processes * cfg.grad_accum / max(tokens, 1)
        per_token = 1.0 / max(tokens, 1)  # the same normalisation for gradients taken with autograd.grad

        # 2. Forward and backward on each micro-batch: teacher, student, features, alpha, KD + CE sums.
        log_now = (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps
        sums = WindowSums(acc.device)
        for batch, teacher_logits in window:
            with acc.accumulate(self.student):
                out = self.objective(batch, teacher_logits, ctl, want_kl=log_now or ctl.wants_features)
                sums.add(out)
                kd = partial(self.objective.kd, out) if self.objective.distils else None
                ctl.record(kd, scale=cfg.kd_weight * per_token, **out.for_control())  # what a preview needs
                acc.backward(out.loss * scale)

        # 3. The window's gradient (unclipped) for previews; a strategy that chooses after seeing it (greedy).
        ctl.after_gradient()

        # 4. Clip and measure the gradient norm (an infinite threshold only measures); a non-finite loss or norm
        # skips the step (counted) or stops with the statistics.
        row = self._row(step, sums.reduced(acc), tokens, padding_share, ctl, log_now)
        if not (math.isfinite(row["loss"]) and (row["grad_norm"] is None or math.isfinite(row["grad_norm"]))):
            row.update(self.window.rollout_row())
            return self._skip(row, row["loss"])

        # 5. Counterfactuals from the optimiser state before the step: the paired reward and the probe.
        measured = ctl.measure(partial(self.window.peek_next, step))

        # 6. The update: optimizer and scheduler step, the loss's own schedule (TAID) once per step.
        self.optimizer.step()
        if self.scheduler is not None and not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.advance(tokens)
        if self.objective.caps is not None and self.objective.caps.has_schedule:
            self.loss.update(row["kd"])

        # 7. After the step: the legacy same-batch reward; the row to log.
        measured.update(ctl.after_step())
        speed = tokens / max(time.perf_counter() - started, 1e-9)
        row.update(reward=measured.pop("reward", None), lr=self._lr(), tokens_per_sec=speed,
                   skipped_steps=self.state.skipped_steps, **measured)  # fmt: skip
        row.update(self.window.rollout_row())
        return self.control.merge_log(row)

    def _row(self, step: int, totals: dict[str, float], tokens: int, padding: float, ctl: Any, log_now: bool):
        """The step's statistics up to the gradient norm (clipping the gradients in place on the way)."""
        cfg, n = self.cfg, max(tokens, 1)
        clip = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(self.student.parameters(), clip)
        if grad_norm is None:  # an engine that clips by itself (DeepSpeed): the local norm, for the check
            grads = {n: p.grad for n, p in as_params(self.accelerator.unwrap_model(self.student)).items()}
            grads = {name: g for name, g in grads.items() if g is not None}
            grad_norm = global_norm(grads) if grads else None
        has_kl = self.loss is not None and (log_now or ctl.wants_features)
        return {
            "step": step + 1,
            "loss": totals["loss"] / n,
            "kd": totals["kd"] / n if self.loss is not None else None,
            "ce": totals["ce"] / n if cfg.ce_weight != 0 else None,
            "fkl": totals["fkl"] / n if has_kl else None,
            "rkl": totals["rkl"] / n if has_kl else None,
            **ctl.alpha_row(),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "padding_share": padding,
        }

    def _skip(self, row: dict[str, Any], loss_value: float) -> dict[str, Any]:
        """A non-finite step: skip it (count it) or stop, as ``trainer.on_nonfinite`` says."""
        acc, cfg = self.accelerator, self.cfg
        fp16_overflow = acc.scaler is not None and math.isfinite(loss_value)
        if fp16_overflow:  # the gradient scaler's business: it skips this step and lowers its scale
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        self.state.skipped_in_a_row += 1
        stop = cfg.on_nonfinite == "stop" and not fp16_overflow
        if stop or self.state.skipped_in_a_row > cfg.max_skipped:
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.step + 1}: loss={row['loss']}, fkl={row['fkl']}, "
                f"rkl={row['rkl']}, alpha_mean={row['alpha_mean']}, grad_norm={row['grad_norm']} "
                f"({self.state.skipped_steps} step(s) skipped so far; trainer.on_nonfinite={cfg.on_nonfinite})."
            )
        self.state.step += 1
        row.update(skipped_steps=self.state.skipped_steps, reward=None, lr=self._lr(), tokens_per_sec=None)
        return row

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ----------------------------------------------------------------------------------------------------------------
    # The loop

    def fit(self, resume_from: str | Path | None = None) -> TrainState:
        """Run (or continue) training to ``max_steps``; returns the final counters.

        Temporary directories a killed save left behind are cleaned first. SIGINT / SIGTERM finish the step in
        progress, write a checkpoint and raise :class:`TrainingInterrupted`. A run that ends with non-finite weights
        or with more than ``max_skipped_fraction`` of its steps skipped raises :class:`RunFailedError` after its
        last checkpoint, without writing ``final/``.

        Args:
            resume_from: a checkpoint directory to continue from (every process loads it).
        """
        cfg = self.cfg
        if self.is_main:
            ckpt.clean_stale(self.run_dir / "checkpoints")
            ckpt.clean_stale_outputs(self.run_dir)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.rollout.validates_at_start and self.state.step == 0:
            self._validate(0)
        self.student.train()
        bar = progress_bar(total=cfg.max_steps, initial=self.state.step, desc=cfg.progress_desc,
                           disable=not (self.is_main and cfg.progress))  # fmt: skip
        with StopSignals(announce=self.is_main) as signals:
            while self.state.step < cfg.max_steps:
                first = self.state.step  # a horizon segment runs several steps, validated and saved at its end
                rows = self.branches.run(first) if self.branches.due(first) else [self.train_step()]
                step = self.state.step
                for row in rows:
                    self._log(row, row["step"])
                    bar.update(1)
                alpha = {"alpha": f"{row['alpha_mean']:.3f}"} if row.get("alpha_mean") is not None else {}
                bar.set_postfix(loss=f"{row['loss']:.4f}", **alpha)
                stop = signals.agreed(self.accelerator)
                if not stop and (_crossed(first, step, cfg.eval_interval) or step == cfg.max_steps):
                    self._validate_and_keep_best(step)
                if stop or _crossed(first, step, cfg.save_interval) or step == cfg.max_steps:
                    path = self.save_checkpoint()
                if stop:
                    bar.close()
                    self.logger.close()
                    where = f"checkpoint {path} written" if path is not None else "checkpoint written"
                    raise TrainingInterrupted(
                        f"stopped by {signal.Signals(stop).name} after step {step} of {cfg.max_steps}; {where}",
                        stop,
                        path,
                    )
        bar.close()
        failure = self.state.verdict(self.cfg, self.run_dir / "checkpoints", self._unhealthy())
        if failure is not None:
            self.logger.close()
            raise RunFailedError(failure)
        self._save_model("final")
        self.logger.close()
        return self.state

    def _log(self, row: dict[str, Any], step: int) -> None:
        """Write the row every ``log_interval`` steps, at the end, and on every probe and reward step (the report's
        alpha_signal block reads them all)."""
        measured = row.get("alpha_signal_slope") is not None or row.get("reward") is not None
        if step % self.cfg.log_interval == 0 or step == self.cfg.max_steps or measured:
            self.logger.log(row)
            self.state.history.append({k: v for k, v in row.items() if isinstance(v, (int, float))})

    def _validate(self, step: int) -> dict[str, float]:
        """Validate (RNG-neutral), log the row and show it to the rollout source (DistiLLM adapts on it)."""
        row = self.validator(self.student, self.accelerator)
        self.logger.log({"step": step, "split": "validation", **row})
        self.rollout.observe_validation(row)
        return row

    def _validate_and_keep_best(self, step: int) -> None:
        if not self.validator.enabled:
            return
        if not self.weights_finite():
            self.logger.log({"step": step, "split": "validation", "weights_finite": False})
            return
        row = self._validate(step)
        if self.validator.improves(row, self.state.best_value) and self._save_model("best"):
            self.state.best_value, self.state.best_step = row[self.cfg.best_metric], step


def _crossed(first: int, last: int, every: int) -> bool:
    """Whether steps ``first + 1 .. last`` include a multiple of ``every`` (0: never)."""
    return bool(every) and last // every > first // every
