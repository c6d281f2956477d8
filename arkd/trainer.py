"""The distillation loop on accelerate: one file, readable top to bottom.

The trainer receives built objects (student, teacher, tokenizer, batches, alpha strategy, loss, optimizer, scheduler,
accelerator) and runs optimizer steps. One optimizer step is:

1. draw the accumulation window (``grad_accum`` micro-batches per process) and count its response tokens across the
   window and all processes: every loss is a *sum* over tokens divided once by that count, so batch 4 x 1 step and
   batch 2 x 2 steps give the same gradient, and so do 1 and N processes;
2. for each micro-batch: teacher forward (eval mode, no_grad), student forward, teacher-student features (no grad),
   ``alpha = strategy.select(ctx)``, loss = kd_weight * KD(alpha) [+ ce_weight * CE], backward;
3. a non-finite loss or gradient norm skips the step (counted in ``metrics.jsonl``) or stops the run, as configured;
4. clip, optimizer step, scheduler step;
5. every ``reward_interval`` steps, for strategies that learn: one student forward (no grad) on the window's last
   micro-batch gives the teacher-student divergence after the step; reward = D_before - D_after at the strategy's
   granularity; ``strategy.update(reward)``;
6. log, validate (loss and Rouge-L; the best student by validation Rouge-L is kept), checkpoint.

Everything a run needs to continue after a crash is in its checkpoint (see :mod:`arkd.checkpoint`).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from arkd import checkpoint as ckpt
from arkd.metrics import MetricsLogger

# --------------------------------------------------------------------------------------------------------------------
# Options and small helpers


@dataclass
class TrainerConfig:
    """Options of the loop (the ``trainer`` config group holds the same keys).

    Attributes:
        max_steps: optimizer steps to run.
        grad_accum: micro-batches per optimizer step and process.
        max_grad_norm: gradient clipping threshold (None or <= 0: no clipping).
        kd_weight: weight of the distillation term (0 with no teacher: plain SFT).
        ce_weight: weight of the cross-entropy term on the reference responses.
        temperature: softmax temperature of the features and rewards (the loss carries its own).
        feature_mu: head mass of the AKL-style features (``compute_features(mu=)``).
        reward_interval: compute the reward and update the strategy every this many steps.
        log_interval: write a ``metrics.jsonl`` row every this many steps.
        eval_interval: validate every this many steps (0: only at the end).
        save_interval: checkpoint every this many steps (0: only at the end).
        keep_last: checkpoints to keep (0: all).
        best_metric: the validation metric that picks ``best/``: ``val_rougeL`` (higher is better) or a loss such
            as ``val_loss`` (lower is better).
        on_nonfinite: "skip" (skip the step and count it) or "stop" (raise with the step and statistics).
        max_skipped: stop anyway after this many skipped steps in a row.
        max_skipped_fraction: a run that ends with more than this share of its steps skipped fails
            (:class:`RunFailedError`: no ``final/``, a non-zero exit code); 1.0 never fails for skips.
        output_dir: the run directory.
        progress: show a progress bar on the main process.
        progress_desc: the progress bar's label.
    """

    max_steps: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    feature_mu: float = 0.5
    reward_interval: int = 1
    log_interval: int = 10
    eval_interval: int = 0
    save_interval: int = 0
    keep_last: int = 2
    best_metric: str = "val_rougeL"
    on_nonfinite: str = "skip"
    max_skipped: int = 100
    max_skipped_fraction: float = 0.1
    output_dir: str = "."
    progress: bool = True
    progress_desc: str = "train"

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {self.max_steps}.")
        if self.grad_accum < 1:
            raise ValueError(f"trainer.grad_accum must be >= 1, got {self.grad_accum}.")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"trainer.on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}.")
        if self.reward_interval < 1:
            raise ValueError(f"reward.interval must be >= 1, got {self.reward_interval}.")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"trainer.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}.")


class NonFiniteLossError(RuntimeError):
    """Raised with ``on_nonfinite="stop"`` when a step's loss or gradient is NaN or infinite."""


class RunFailedError(RuntimeError):
    """The run reached ``max_steps`` but failed: its weights are not finite, or more than
    ``max_skipped_fraction`` of its steps were skipped. No ``final/`` was written; the message is one sentence."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived: the step in progress was finished and a checkpoint written.

    Attributes:
        signum: the signal's number (the CLI exits with ``128 + signum``).
        checkpoint: the checkpoint written, or None.
    """

    def __init__(self, message: str, signum: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


class _StopSignals:
    """While active (main thread only), the first SIGINT / SIGTERM sets ``received`` instead of killing the
    process, so the loop can finish its step and checkpoint; a second one raises ``KeyboardInterrupt`` at once."""

    def __init__(self, announce: bool) -> None:
        self.received: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        if self.announce:
            print(
                f"\narkd: {signal.Signals(signum).name} received: finishing the current step and writing a "
                "checkpoint (send it again to stop at once).",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class BatchStream:
    """Endless iteration over a resumable data loader: one epoch after the other, position saved with the run.

    Args:
        loader: an ``arkd.data.ResumableDataLoader`` (``arkd.data.build_dataloader``): seeded shuffling, sharded
            over processes, with ``state_dict`` / ``load_state_dict`` counting the samples delivered.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._iterator: Any = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):  # the end of an epoch: start the next one
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise ValueError("the training data loader yields no batch: expected at least one full batch per process.")

    def state_dict(self) -> dict[str, int]:
        """The data position (epoch, samples of this epoch delivered, seed, world size)."""
        return dict(self.loader.state_dict())

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
        self.loader.load_state_dict(state)


def next_token_view(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits with the tokens they predict: ``logits[:, :-1]``, ``loss_mask[:, 1:]``, ``input_ids[:, 1:]``.

    Args:
        logits: ``[B, T, V]``.
        batch: the batch dict (``loss_mask`` and ``input_ids`` ``[B, T]``).

    Returns:
        ``[B, T-1, V]`` logits, ``[B, T-1]`` bool mask, ``[B, T-1]`` target ids.
    """
    return logits[:, :-1], batch["loss_mask"][:, 1:].bool(), batch["input_ids"][:, 1:]


def token_kl_sums(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over counted tokens of FKL = KL(p||q) and RKL = KL(q||p) (fp32, no grad; for logging and validation).

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]``.
        mask: ``[B, T]`` bool.
        temperature: softmax temperature.

    Returns:
        Two scalar tensors.
    """
    with torch.no_grad():
        log_q = torch.log_softmax(student_logits[mask].float() / temperature, dim=-1)
        log_p = torch.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
        diff = log_p - log_q
        fkl = torch.where(torch.isfinite(diff), log_p.exp() * diff, 0.0).sum()
        rkl = torch.where(torch.isfinite(diff), log_q.exp() * -diff, 0.0).sum()
    return fkl, rkl


@dataclass
class TrainState:
    """Counters that survive a resume."""

    step: int = 0
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    tokens_seen: int = 0
    best_value: float | None = None
    best_step: int = -1
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
            "tokens_seen": self.tokens_seen,
            "best_value": self.best_value,
            "best_step": self.best_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Distil (or fine-tune) a student with an alpha strategy on accelerate.

    Args:
        student: the student model (a causal LM returning ``.logits``); prepared here.
        teacher: the teacher, or None for plain SFT (``kd_weight`` must then be 0). Frozen here.
        tokenizer: saved next to the final and best models.
        batches: a :class:`BatchStream` (or any iterator of batch dicts with ``state_dict``/``load_state_dict``).
        strategy: an ``arkd.policy.AlphaStrategy`` (or None for plain SFT).
        loss: the KD loss module with ``reduction="sum"`` (``takes_alpha`` True: ``loss(s, t, m, alpha=alpha)``);
            None for plain SFT.
        optimizer: the student's optimizer.
        scheduler: a learning-rate scheduler stepped once per optimizer step (or None).
        accelerator: an ``accelerate.Accelerator`` built with ``gradient_accumulation_steps=grad_accum``.
        config: a :class:`TrainerConfig`.
        reward_fn: ``(student_logits, teacher_logits, mask, granularity=...) -> D``, the alignment the reward is the
            improvement of (``arkd.reward.alignment``); needed when ``strategy.needs_reward``.
        validation_batches: a list of batch dicts for the validation loss (sharded over processes here).
        validation_examples: examples (with ``references``) for validation Rouge-L.
        predict_fn: ``(model, examples) -> list[str]``: greedy or sampled generations for Rouge-L.
        score_fn: ``(predictions, references) -> float``: Rouge-L x 100.
        logger: a :class:`MetricsLogger` (None: one is created in ``output_dir`` on the main process).
        lookahead_fn: ``(trainer, batch, grads_ctx) -> callable`` building ``ctx.lookahead`` for searching strategies
            (None: :func:`make_lookahead`).
    """

    def __init__(
        self,
        *,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        tokenizer: Any,
        batches: Any,
        strategy: Any,
        loss: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        accelerator: Any,
        config: TrainerConfig,
        reward_fn: Callable[..., torch.Tensor] | None = None,
        validation_batches: list[dict[str, torch.Tensor]] | None = None,
        validation_examples: Sequence[Any] | None = None,
        predict_fn: Callable[[torch.nn.Module, Sequence[Any]], list[str]] | None = None,
        score_fn: Callable[[list[str], list[list[str]]], float] | None = None,
        logger: MetricsLogger | None = None,
    ) -> None:
        if teacher is None and (config.kd_weight != 0 or loss is not None):
            raise ValueError("a KD run needs a teacher: set `teacher=...` (or use `loss=cross_entropy` for SFT).")
        if config.kd_weight == 0 and config.ce_weight == 0:
            raise ValueError("trainer.kd_weight and trainer.ce_weight are both 0: nothing to train.")
        if strategy is not None and strategy.needs_reward and reward_fn is None:
            raise ValueError(f"{type(strategy).__name__} learns from rewards: set the `reward` config.")
        self.cfg = config
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.batches = batches
        self.strategy = strategy
        self.loss = loss.to(accelerator.device) if loss is not None else None
        self.reward_fn = reward_fn
        self.validation_batches = validation_batches or []
        self.validation_examples = list(validation_examples or [])
        self.predict_fn, self.score_fn = predict_fn, score_fn
        self.run_dir = Path(config.output_dir)
        self.state = TrainState()
        self.is_main = accelerator.is_main_process

        # The student trains; the teacher is frozen, in eval mode, and only ever runs under no_grad.
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.scheduler = scheduler
        self.teacher = None
        if teacher is not None:
            self.teacher = prepare_teacher(accelerator, teacher)
        self.logger = logger or MetricsLogger(self.run_dir, enabled=self.is_main)
        accelerator.gradient_accumulation_steps = config.grad_accum

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_XXXXXXX/`` atomically (every process takes part; the main one writes)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        healthy = self.weights_finite() and self._skipped_share() <= self.cfg.max_skipped_fraction
        model_state = acc.get_state_dict(self.student)
        rng_states = _gather_objects(acc, ckpt.capture_rng_state())
        path = None
        if self.is_main:
            config_file = self.run_dir / "config.yaml"
            config_text = config_file.read_text() if config_file.is_file() else None
            state = {
                "train": self.state.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "strategy": self.strategy.state_dict() if self.strategy is not None else None,
                "loss": self.loss.state_dict() if self.loss is not None else None,
                "data": self.batches.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "world_size": acc.num_processes,
            }
            path = ckpt.write_checkpoint(
                self.run_dir / "checkpoints",
                self.state.step,
                model_state=model_state,
                state=state,
                rng_states=rng_states,
                keep_last=self.cfg.keep_last,
                healthy=healthy,
                config_text=config_text,
            )
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything saved by :meth:`save_checkpoint` (on every process); a checkpoint that fails its
        manifest or cannot be read raises :class:`arkd.checkpoint.CheckpointError` (one sentence)."""
        path = Path(path)
        problem = ckpt.verify_checkpoint(path)
        if problem is not None:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: {problem}; expected a complete checkpoint written by arkd-train "
                "(trainer.resume=auto falls back to the newest good one)."
            )
        try:
            self._load_checkpoint(path)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: {type(err).__name__}: {first[:300]}; expected a checkpoint of this run's "
                "model, optimizer and strategy."
            ) from err

    def _load_checkpoint(self, path: Path) -> None:
        weights = ckpt.load_weights(path / ckpt.MODEL_FILE)
        self.accelerator.unwrap_model(self.student).load_state_dict(weights, strict=True)
        state = ckpt.read_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.strategy is not None and state["strategy"] is not None:
            self.strategy.load_state_dict(state["strategy"])
        if self.loss is not None and state.get("loss"):
            self.loss.load_state_dict(state["loss"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        self.state.load_state_dict(state["train"])
        rng = ckpt.read_rng_state(path, self.accelerator.process_index)
        if rng is not None:
            ckpt.restore_rng_state(rng)

    def weights_finite(self) -> bool:
        """Whether every parameter of the student is finite, on every process (a collective)."""
        acc = self.accelerator
        model = acc.unwrap_model(self.student)
        bad = any(not bool(torch.isfinite(p.detach()).all()) for p in model.parameters() if p.numel())
        flag = torch.tensor(float(bad), device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        return flag.item() == 0

    def _skipped_share(self) -> float:
        return self.state.skipped_steps / max(self.state.step, 1)

    def _save_model(self, name: str) -> bool:
        """``save_pretrained`` the student and the tokenizer to ``run_dir/name`` (atomically, main process), only
        when every weight is finite; returns whether it was written."""
        acc = self.accelerator
        if not self.weights_finite():
            return False
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.student)
        if self.is_main:
            import shutil

            tmp, final = self.run_dir / f".tmp_{name}", self.run_dir / name
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                acc.unwrap_model(self.student).save_pretrained(tmp, state_dict=state)
                if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                    self.tokenizer.save_pretrained(tmp)
            except (OSError, RuntimeError) as err:  # full or read-only disk: the previous `name/` stays as it was
                shutil.rmtree(tmp, ignore_errors=True)
                from arkd.errors import OutputError, describe_os_error

                reason = describe_os_error(err) if isinstance(err, OSError) else " ".join(str(err).split())[:200]
                raise OutputError(f"cannot write {final}: {reason}; the previous {name}/ is untouched.") from None
            old = self.run_dir / f".old_{name}"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():  # moved aside, not deleted, until the new one is in place
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return True

    # ----------------------------------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss (cross-entropy per response token; FKL / RKL when there is a teacher) and Rouge-L."""
        acc = self.accelerator
        self.student.eval()
        sums = torch.zeros(4, device=acc.device)  # ce, fkl, rkl, tokens
        # Processes may hold different numbers of validation batches: plain forwards, no DDP collectives.
        for batch in self.validation_batches[acc.process_index :: acc.num_processes]:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            s_logits, t_logits = self._forward(batch, student=acc.unwrap_model(self.student))
            s, m, targets = next_token_view(s_logits, batch)
            sums[0] += F.cross_entropy(s[m].float(), targets[m], reduction="sum")
            if t_logits is not None:
                fkl, rkl = token_kl_sums(s, t_logits[:, :-1], m, self.cfg.temperature)
                sums[1] += fkl
                sums[2] += rkl
            sums[3] += m.sum()
        sums = acc.reduce(sums, reduction="sum")
        tokens = max(sums[3].item(), 1.0)
        row: dict[str, float] = {"val_loss": sums[0].item() / tokens}
        if self.teacher is not None:
            row.update(val_fkl=sums[1].item() / tokens, val_rkl=sums[2].item() / tokens)
        if self.validation_examples and self.predict_fn is not None and self.score_fn is not None:
            shard = self.validation_examples[acc.process_index :: acc.num_processes]
            predictions = self.predict_fn(acc.unwrap_model(self.student), shard)
            predictions = _unshard(_gather_objects(acc, predictions), len(self.validation_examples))
            references = [list(example.references) for example in self.validation_examples]
            row["val_rougeL"] = float(self.score_fn(predictions, references))
        self.student.train()
        return row

    # ----------------------------------------------------------------------------------------------------------------
    # The step

    def _forward(
        self, batch: dict[str, torch.Tensor], student: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Student logits (with grad when enabled) and teacher logits (always no_grad), both ``[B, T, V]``."""
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
        student = student if student is not None else self.student
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return student_logits, teacher_logits

    def _kd(
        self, s: torch.Tensor, t: torch.Tensor, m: torch.Tensor, alpha: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        """The KD term, summed over counted tokens (alpha and target ids for the losses that take them)."""
        extra: dict[str, Any] = {}
        if getattr(self.loss, "takes_alpha", False):
            extra["alpha"] = alpha
        if getattr(self.loss, "needs_target_ids", False):
            extra["target_ids"] = targets
        return self.loss(s, t, m, **extra)

    def _select_alpha(
        self, s: torch.Tensor, t: torch.Tensor, m: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Any]:
        """Features of the step (no grad) and the strategy's alpha (``[]``, ``[B]`` or ``[B, T-1]``)."""
        from arkd.policy import StepContext
        from arkd.policy.features import compute_features

        options = {"mu": self.cfg.feature_mu, **getattr(self.strategy, "feature_options", {})}
        features = compute_features(s.detach(), t, m, temperature=self.cfg.temperature, **options)
        ctx = StepContext(
            features=features,
            progress=self.state.step / self.cfg.max_steps,
            step=self.state.step,
            lookahead=make_lookahead(self, batch),  # lazy: costs nothing unless a strategy calls it
        )
        alpha = self.strategy.select(ctx)
        return torch.as_tensor(alpha, dtype=torch.float32, device=s.device), features

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over one accumulation window; returns the statistics to log."""
        acc, cfg = self.accelerator, self.cfg
        started = time.perf_counter()

        # accelerate syncs gradients (DDP) and lets the optimizer step on the window's last micro-batch only.
        acc.gradient_accumulation_steps, acc.step = cfg.grad_accum, 0

        # 1. The window, and its counted tokens over all micro-batches and processes.
        window = [{k: v.to(acc.device) for k, v in next(self.batches).items()} for _ in range(cfg.grad_accum)]
        local_tokens = sum(int(b["loss_mask"][:, 1:].sum()) for b in window)
        global_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum").item())
        # Each process backpropagates sum / N_global; DDP averages gradients over processes and accelerate divides
        # by grad_accum, so both are multiplied back here: the result is the exact token mean of the global window.
        scale = acc.num_processes * cfg.grad_accum / max(global_tokens, 1)

        # 2. Forward and backward on each micro-batch.
        stats = torch.zeros(5, device=acc.device)  # total loss sum, kd sum, ce sum, fkl sum, rkl sum
        alphas, last = [], None
        log_now = (self.state.step + 1) % cfg.log_interval == 0 or self.state.step + 1 == cfg.max_steps
        for batch in window:
            with acc.accumulate(self.student):
                s_logits, t_logits = self._forward(batch)
                s, m, targets = next_token_view(s_logits, batch)
                loss_sum = s.new_zeros((), dtype=torch.float32)
                alpha = None
                if self.loss is not None and cfg.kd_weight != 0:
                    t = t_logits[:, :-1]
                    features = None
                    if self.strategy is not None:
                        alpha, features = self._select_alpha(s, t, m, batch)
                        alphas.append(_masked_alpha_values(alpha, m))
                    kd_sum = self._kd(s, t, m, alpha, targets)
                    loss_sum = loss_sum + cfg.kd_weight * kd_sum
                    stats[1] += kd_sum.detach()
                    if features is not None:  # FKL / RKL per token are among the features already
                        stats[3] += features.fkl.sum().to(stats.device)
                        stats[4] += features.rkl.sum().to(stats.device)
                    elif log_now:
                        fkl, rkl = token_kl_sums(s, t, m, cfg.temperature)
                        stats[3] += fkl
                        stats[4] += rkl
                if cfg.ce_weight != 0:
                    ce_sum = F.cross_entropy(s[m].float(), targets[m], reduction="sum")
                    loss_sum = loss_sum + cfg.ce_weight * ce_sum
                    stats[2] += ce_sum.detach()
                stats[0] += loss_sum.detach()
                acc.backward(loss_sum * scale)
                last = (batch, s.detach(), None if t_logits is None else t_logits[:, :-1], m, alpha)

        # 3. Non-finite loss or gradients: skip the step (and count it) or stop with the statistics.
        grad_norm = None
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
        stats = acc.reduce(stats, reduction="sum")
        loss_value = stats[0].item() / max(global_tokens, 1)
        finite = math.isfinite(loss_value) and (grad_norm is None or bool(torch.isfinite(grad_norm)))
        alpha_all = torch.cat(alphas) if alphas else None
        has_kl = self.loss is not None and (log_now or self.strategy is not None)
        row: dict[str, Any] = {
            "step": self.state.step + 1,
            "loss": loss_value,
            "kd": stats[1].item() / max(global_tokens, 1) if self.loss is not None else None,
            "ce": stats[2].item() / max(global_tokens, 1) if cfg.ce_weight != 0 else None,
            "fkl": stats[3].item() / max(global_tokens, 1) if has_kl else None,
            "rkl": stats[4].item() / max(global_tokens, 1) if has_kl else None,
            "alpha_mean": alpha_all.mean().item() if alpha_all is not None and alpha_all.numel() else None,
            "alpha_std": alpha_all.std(unbiased=False).item() if alpha_all is not None and alpha_all.numel() else None,
            "grad_norm": grad_norm.item() if grad_norm is not None else None,
        }
        if not finite:
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

        # 4. Optimizer and scheduler step.
        self.optimizer.step()
        if self.scheduler is not None and not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.skipped_in_a_row = 0
        self.state.tokens_seen += global_tokens
        if self.loss is not None and callable(getattr(self.loss, "update", None)):
            self.loss.update(row["kd"])  # losses with a schedule of their own (TAID) advance once per step

        # 5. Immediate reward: how much this step improved teacher-student alignment on the last micro-batch.
        reward_value = None
        strategy = self.strategy
        if (
            strategy is not None
            and strategy.needs_reward
            and last is not None
            and last[4] is not None
            and self.state.step % cfg.reward_interval == 0
        ):
            batch, s_before, t, m, _ = last
            granularity = strategy.granularity
            d_before = self.reward_fn(s_before, t, m, temperature=cfg.temperature, granularity=granularity)
            with torch.no_grad():
                model = acc.unwrap_model(self.student)  # no DDP hooks: a plain forward on this process's batch
                s_after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            d_after = self.reward_fn(s_after[:, :-1], t, m, temperature=cfg.temperature, granularity=granularity)
            reward = (d_before - d_after).detach()
            strategy.update(reward)
            reward_value = acc.reduce(reward.float().mean().reshape(1), reduction="mean").item()

        row.update(
            reward=reward_value,
            lr=self._lr(),
            tokens_per_sec=global_tokens / max(time.perf_counter() - started, 1e-9),
            skipped_steps=self.state.skipped_steps,
        )
        if strategy is not None:
            # The strategy's extras (policy entropy, concentration, baseline, ...); the window-wide statistics
            # computed above win over its view of the last micro-batch.
            merged = {"step": row["step"], **strategy.last_log()}
            merged.update({k: v for k, v in row.items() if v is not None or k not in merged})
            row = merged
        row.setdefault("policy_entropy", None)
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
            self._clean_stale()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        self.student.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.state.step,
            desc=cfg.progress_desc,
            disable=not (self.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        with _StopSignals(announce=self.is_main) as signals:
            while self.state.step < cfg.max_steps:
                row = self.train_step()
                step = self.state.step
                if step % cfg.log_interval == 0 or step == cfg.max_steps:
                    self.logger.log(row)
                    self.state.history.append({k: v for k, v in row.items() if isinstance(v, (int, float))})
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    **({"alpha": f"{row['alpha_mean']:.3f}"} if row.get("alpha_mean") is not None else {}),
                )
                stop = self._agreed_signal(signals.received)
                if not stop and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps):
                    self._validate_and_keep_best(step)
                if stop or (cfg.save_interval and step % cfg.save_interval == 0) or step == cfg.max_steps:
                    path = self.save_checkpoint()
                if stop:
                    bar.close()
                    self.logger.close()
                    name = signal.Signals(stop).name
                    where = f"checkpoint {path} written" if path is not None else "checkpoint written"
                    raise TrainingInterrupted(
                        f"stopped by {name} after step {step} of {cfg.max_steps}; {where}", stop, path
                    )
        bar.close()
        failure = self._failure()
        if failure is not None:
            self.logger.close()
            raise RunFailedError(failure)
        self._save_model("final")
        self.logger.close()
        return self.state

    def _clean_stale(self) -> None:
        """Remove what an interrupted save left behind: temporary checkpoint, ``best/`` and ``final/`` folders."""
        import shutil

        ckpt.clean_stale(self.run_dir / "checkpoints")
        for name in ("best", "final"):
            shutil.rmtree(self.run_dir / f".tmp_{name}", ignore_errors=True)
            old = self.run_dir / f".old_{name}"
            if old.is_dir() and not (self.run_dir / name).exists():  # killed between the two renames
                old.rename(self.run_dir / name)
            shutil.rmtree(old, ignore_errors=True)

    def _agreed_signal(self, received: int | None) -> int:
        """The signal number when any process received SIGINT / SIGTERM (0 otherwise), agreed by all processes."""
        value = float(received or 0)
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(value, device=self.accelerator.device)
            value = self.accelerator.reduce(flag, reduction="max").item()
        return int(value)

    def _failure(self) -> str | None:
        """One sentence on why the finished run failed, or None when it succeeded."""
        cfg, state = self.cfg, self.state
        good = [p for _, p in ckpt.list_checkpoints(self.run_dir / "checkpoints") if ckpt.is_healthy(p)]
        keep = f"the last healthy checkpoint is {good[-1]}" if good else "no healthy checkpoint was kept"
        if not self.weights_finite():
            return (
                f"the run failed: the student's weights are not finite after step {state.step} (a diverged run; "
                f"lower optimizer.lr or set trainer.max_grad_norm); final/ was not written and {keep}."
            )
        share = self._skipped_share()
        if share > cfg.max_skipped_fraction:
            return (
                f"the run failed: {state.skipped_steps} of {state.step} steps ({100 * share:.0f}%) were skipped for a "
                f"non-finite loss or gradient, more than trainer.max_skipped_fraction={cfg.max_skipped_fraction}; "
                f"final/ was not written and {keep}."
            )
        return None

    def _validate_and_keep_best(self, step: int) -> None:
        if not self.validation_batches and not self.validation_examples:
            return
        if not self.weights_finite():
            self.logger.log({"step": step, "split": "validation", "weights_finite": False})
            return
        # Validation may reseed (sampled generations): the training streams (dropout, sampling) continue
        # afterwards exactly where they were, whatever the validation drew.
        rng = ckpt.capture_rng_state()
        try:
            row = self.validate()
        finally:
            ckpt.restore_rng_state(rng)
        self.logger.log({"step": step, "split": "validation", **row})
        score = row.get(self.cfg.best_metric)
        if score is None or not math.isfinite(score):
            return
        higher_is_better = "rouge" in self.cfg.best_metric.lower()
        best = self.state.best_value
        if best is None or (score > best if higher_is_better else score < best):
            if self._save_model("best"):
                self.state.best_value, self.state.best_step = score, step


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


# --------------------------------------------------------------------------------------------------------------------
# Greedy one-step lookahead (ctx.lookahead)


def make_lookahead(trainer: Trainer, batch: dict[str, torch.Tensor]) -> Callable[[float], float]:
    """``alpha -> reward`` for strategies that search alpha (greedy): the alignment gain of a trial step.

    The KD loss is linear in alpha, so its gradient is too: ``g(alpha) = alpha * g_F + (1 - alpha) * g_R`` with
    ``g_F``, ``g_R`` the gradients of the token-mean FKL and RKL. They are computed on the first call (two backward
    passes, in eval mode so that dropout does not blur the comparison); each candidate then costs one no-grad
    forward (``torch.func.functional_call``, via ``arkd.reward.linear_lookahead``) at the parameters the optimiser
    would reach from ``g(alpha)``: clipped to ``max_grad_norm``, then the Adam/AdamW update from the optimiser's
    current state (``arkd.reward.adam_step_preview``; plain SGD for other optimisers). The score is
    ``D(theta) - D(theta')`` with ``D = (FKL + RKL) / 2``.
    """
    from torch.func import functional_call

    from arkd.reward import adam_step_preview, alignment, linear_lookahead

    model = trainer.accelerator.unwrap_model(trainer.student)
    # The trial steps are the optimiser's own (Adam/AdamW moments, bias correction, weight decay) after the trainer's
    # gradient clipping; another optimiser gets a plain SGD step at the current learning rate.
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    update = adam_step_preview(inner) if isinstance(inner, torch.optim.Adam) else None
    temperature = trainer.cfg.temperature
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    built: list[Callable[[float], float]] = []

    def build() -> Callable[[float], float]:
        was_training = model.training
        model.eval()
        try:
            params = {name: p for name, p in model.named_parameters() if p.requires_grad}
            with torch.no_grad():
                t = trainer.teacher(**inputs).logits[:, :-1]
            with torch.enable_grad():
                s, m, _ = next_token_view(model(**inputs).logits, batch)
                fkl, rkl = _kl_means(s, t, m, temperature)
                names = list(params)
                g_f = torch.autograd.grad(fkl, [params[k] for k in names], retain_graph=True, allow_unused=True)
                g_r = torch.autograd.grad(rkl, [params[k] for k in names], allow_unused=True)
            d_before = float((fkl + rkl).detach() / 2)
        finally:
            model.train(was_training)

        def reward_fn(new_params: dict[str, torch.Tensor]) -> float:
            was = model.training
            model.eval()
            try:
                logits = functional_call(model, new_params, args=(), kwargs=inputs).logits[:, :-1]
            finally:
                model.train(was)
            return d_before - float(alignment(logits, t, m, temperature=temperature))

        return linear_lookahead(
            params,
            dict(zip(names, g_f)),
            dict(zip(names, g_r)),
            lr=trainer._lr(),
            reward_fn=reward_fn,
            update=update,
            max_grad_norm=trainer.cfg.max_grad_norm,
        )

    def lookahead(alpha: float) -> float:
        if not built:
            built.append(build())
        return built[0](alpha)

    return lookahead


def _kl_means(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token means of FKL and RKL with gradients to the student (fp32; for the look-ahead)."""
    log_q = torch.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    n = max(int(mask.sum()), 1)
    fkl = (log_p.exp() * (log_p - log_q)).sum() / n
    rkl = (log_q.exp() * (log_q - log_p)).sum() / n
    return fkl, rkl


# --------------------------------------------------------------------------------------------------------------------
# Distributed helpers


def _masked_alpha_values(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The alpha values that weighed counted tokens, flat (for the logged mean / std)."""
    alpha = alpha.detach().float()
    if alpha.dim() == 0:
        return alpha.reshape(1)
    if alpha.dim() == 1:
        return alpha[mask.any(dim=-1)] if alpha.shape[0] == mask.shape[0] else alpha
    return alpha[mask] if alpha.shape == mask.shape else alpha.reshape(-1)


def _gather_objects(accelerator: Any, obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (a one-element list in a single process)."""
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def _unshard(shards: list[list[Any]], n: int) -> list[Any]:
    """Undo ``items[rank::world]`` sharding: interleave the per-rank lists back into the original order."""
    out: list[Any] = [None] * n
    world = len(shards)
    for rank, shard in enumerate(shards):
        for j, item in enumerate(shard):
            out[rank + j * world] = item
    return out
