"""The distillation loop on accelerate: one file, readable top to bottom.

The trainer receives built objects (student, teacher, tokenizer, batches, alpha strategy, loss, reward, probe,
optimizer, scheduler, accelerator) and runs optimizer steps. One optimizer step (:meth:`Trainer.train_step`) is:

1. draw the accumulation window (``grad_accum`` micro-batches per process; each dataset batch goes through the
   rollout source, :mod:`arkd.rollout`, which may replace its responses by generated ones) and count its response
   tokens across the
   window and all processes: every loss is a *sum* over tokens divided once by that count, so batch 4 x 1 step and
   batch 2 x 2 steps give the same gradient, and so do 1 and N processes;
2. for each micro-batch (:meth:`Trainer._loss_step` -> :class:`StepOutput`): teacher forward (eval mode, no_grad;
   reused when a preview already ran it), student forward, teacher-student features (no grad), alpha (one
   ``strategy.select`` per optimiser step at batch granularity, one per micro-batch at sequence / token
   granularity), loss = kd_weight * KD(alpha) [+ ce_weight * CE], backward. On steps that preview (a paired reward,
   the probe, greedy search) one more backward gives ``dg/dalpha`` from the same graph;
3. a strategy that chooses after the gradient (greedy) picks alpha from previews of this very step;
4. a non-finite loss or gradient norm (measured with or without clipping) skips the step (counted) or stops the run;
5. on reward and probe steps, from the optimiser state before the step: each candidate alpha's step is previewed
   (:class:`arkd.policy.lookahead.StepPreview`) and scored on the next training batch (whose teacher logits are
   kept for the next step) and on the window, in eval mode; the policy learns from the paired rewards
   (``arkd.reward.PairedReward``) and the probe logs the alpha signal (``arkd.policy.probe``);
6. clip, optimizer step, scheduler step; the legacy same-batch reward (``reward=same_batch``) is measured here with
   the training forward's dropout masks replayed;
7. log, validate (loss and Rouge-L; the best student by validation Rouge-L is kept), checkpoint.

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

from arkd import checkpoint as ckpt
from arkd import distributed as pdist
from arkd.data.collate import model_inputs, shift_for_next_token
from arkd.losses.functional import bidirectional_kl
from arkd.losses.fused import fused_linear_bidirectional_kl
from arkd.losses.topk import TopKTeacher, bidirectional_kl_topk
from arkd.policy.features import Features, compute_features, compute_features_from_hidden
from arkd.policy.lookahead import BatchScorer, StepPreview, as_params, global_norm, step_preview_for
from arkd.policy.strategies import StepContext
from arkd.progress import progress_bar
from arkd.reward import reduce_tokens, token_alignment
from arkd.rollout import DatasetResponses
from arkd.run_log import MetricsLogger

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
        temperature: softmax temperature of the features, the rewards and the logged FKL / RKL (the recipe sets it
            to the loss's ``temperature``: one temperature for a run).
        feature_mu: head mass of the AKL-style features (``compute_features(mu=)``).
        log_interval: write a ``metrics.jsonl`` row every this many steps.
        eval_interval: validate every this many steps (0: only at the end).
        save_interval: checkpoint every this many steps (0: only at the end).
        keep_last: checkpoints to keep (0: all).
        best_metric: the validation metric that picks ``best/`` (``val_rougeL``, ``val_loss``, ``val_fkl``, ...).
        best_mode: ``max`` (higher ``best_metric`` is better, e.g. Rouge-L) or ``min`` (lower, e.g. a loss); None
            takes the known direction of ``val_rougeL`` (max), ``val_loss``, ``val_fkl`` and ``val_rkl`` (min).
        on_nonfinite: "skip" (skip the step and count it) or "stop" (raise with the step and statistics).
        max_skipped: stop anyway after this many skipped steps in a row.
        max_skipped_fraction: a run that ends with more than this share of its steps skipped fails
            (:class:`RunFailedError`: no ``final/``, a non-zero exit code); 1.0 never fails for skips.
        output_dir: the run directory.
        progress: show a progress bar on the main process.
        progress_desc: the progress bar's label.
        fused_linear: compute the bidirectional KD loss from the student's final hidden states and output weight
            (``arkd.losses.fused_linear_bidirectional_kl``) instead of its ``[B, T, V]`` logits with gradients: the
            student forward keeps the logits of the last position only, and the features are computed from chunks
            of logits without autograd. Needs the bidirectional KL loss.
    """

    max_steps: int
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    feature_mu: float = 0.5
    log_interval: int = 10
    eval_interval: int = 0
    save_interval: int = 0
    keep_last: int = 2
    best_metric: str = "val_rougeL"
    best_mode: str | None = None
    on_nonfinite: str = "skip"
    max_skipped: int = 100
    max_skipped_fraction: float = 0.1
    output_dir: str = "."
    progress: bool = True
    progress_desc: str = "train"
    fused_linear: bool = False

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1, got {self.max_steps}.")
        if self.grad_accum < 1:
            raise ValueError(f"trainer.grad_accum must be >= 1, got {self.grad_accum}.")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"trainer.on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}.")
        if self.best_mode is None:
            from arkd.config_check import BEST_MODES

            if self.best_metric not in BEST_MODES:
                raise ValueError(
                    f"trainer.best_mode is needed for best_metric={self.best_metric!r}: expected 'max' or 'min'."
                )
            self.best_mode = BEST_MODES[self.best_metric]
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"trainer.best_mode must be 'max' or 'min', got {self.best_mode!r}.")
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
        self._peeked: tuple[dict[str, torch.Tensor], dict[str, int]] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def _fetch(self) -> dict[str, torch.Tensor]:
        for _ in range(2):  # the end of an epoch: start the next one
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise ValueError("the training data loader yields no batch: expected at least one full batch per process.")

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._peeked is not None:
            batch, self._peeked = self._peeked[0], None
            return batch
        return self._fetch()

    def peek(self) -> dict[str, torch.Tensor]:
        """The batch the next ``next()`` returns (the same object), without moving the saved position past it."""
        if self._peeked is None:
            position = dict(self.loader.state_dict())
            self._peeked = (self._fetch(), position)
        return self._peeked[0]

    def state_dict(self) -> dict[str, int]:
        """The data position (epoch, samples of this epoch delivered, seed, world size); a peeked batch is not
        delivered yet, so a resumed run draws it again."""
        if self._peeked is not None:
            return dict(self._peeked[1])
        return dict(self.loader.state_dict())

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
        self._peeked = None
        self.loader.load_state_dict(state)


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


@dataclass
class StepOutput:
    """One micro-batch's forward: the loss to backpropagate and its named statistics (sums over counted tokens).

    Attributes:
        loss: ``kd_weight * kd + ce_weight * ce`` (with autograd).
        student_logits: ``[B, T-1, V]`` shifted student logits (position t predicts token t + 1).
        teacher_logits: ``[B, T-1, V]`` shifted teacher logits (None without a teacher).
        mask: ``[B, T-1]`` bool, the counted tokens.
        targets: ``[B, T-1]`` the tokens predicted.
        kd, ce: the KD and cross-entropy sums (None when not computed).
        fkl, rkl: FKL and RKL sums for logging (None when not computed).
        tokens: counted tokens.
        alpha: the alpha the KD term used (None without a strategy).
        features: the strategy's teacher-student statistics (None without a strategy).
        batch: the micro-batch (on the device).
        rng: the random state just before the student forward (its dropout masks can be replayed).
        student_hidden: ``[B, T-1, H]`` the student's final hidden states (``trainer.fused_linear``; else None).
    """

    loss: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    mask: torch.Tensor
    targets: torch.Tensor
    kd: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    fkl: torch.Tensor | None = None
    rkl: torch.Tensor | None = None
    tokens: int = 0
    alpha: torch.Tensor | None = None
    features: Features | None = None
    batch: dict[str, torch.Tensor] | None = None
    rng: Any = None
    student_hidden: torch.Tensor | None = None

    def detached(self, *, keep_student: bool, keep_teacher: bool) -> StepOutput:
        """A copy without autograd history, holding the student's / teacher's logits only where asked (a preview
        scores with the teacher's; the legacy reward compares the student's before and after)."""
        return StepOutput(
            loss=self.loss.detach(),
            student_logits=self.student_logits.detach() if keep_student and self.student_logits is not None else None,
            teacher_logits=self.teacher_logits if keep_teacher else None,
            mask=self.mask,
            targets=self.targets,
            kd=None if self.kd is None else self.kd.detach(),
            ce=None if self.ce is None else self.ce.detach(),
            fkl=self.fkl,
            rkl=self.rkl,
            tokens=self.tokens,
            alpha=None if self.alpha is None else self.alpha.detach(),
            features=self.features,
            batch=self.batch,
            rng=self.rng,
        )


@dataclass
class _StepPlan:
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


class _Sums:
    """The window's loss statistics, summed over micro-batches (then over processes)."""

    KEYS = ("loss", "kd", "ce", "fkl", "rkl")

    def __init__(self, device: torch.device) -> None:
        self.values = torch.zeros(len(self.KEYS), device=device, dtype=torch.float32)

    def add(self, out: StepOutput) -> None:
        for i, key in enumerate(self.KEYS):
            value = getattr(out, key)
            if value is not None:
                self.values[i] += value.detach().float().to(self.values.device)

    def reduced(self, accelerator: Any) -> dict[str, float]:
        values = accelerator.reduce(self.values, reduction="sum")
        return {key: float(values[i]) for i, key in enumerate(self.KEYS)}


_PROVISIONAL_ALPHA = 0.5  # the alpha of the window's backward when the strategy chooses after the gradient


def kl_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTeacher,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over counted tokens of FKL = KL(p||q) and RKL = KL(q||p), no grad (``arkd.losses.bidirectional_kl``'s
    components: the loss's own arithmetic, so a student at ``-inf`` where the teacher has mass gives ``inf`` here
    too); over the top-k tokens and the tail bucket for a :class:`arkd.losses.TopKTeacher`."""
    with torch.no_grad():
        if isinstance(teacher_logits, TopKTeacher):
            _, fkl, rkl = bidirectional_kl_topk(
                student_logits.detach(), teacher_logits, mask, temperature=temperature, reduction="sum",
                return_components=True,
            )  # fmt: skip
            return fkl.float(), rkl.float()
        _, fkl, rkl = bidirectional_kl(
            student_logits.detach(),
            teacher_logits.detach(),
            mask,
            temperature=temperature,
            reduction="sum",
            return_components=True,
        )
    return fkl.float(), rkl.float()


def _accumulate(store: dict[str, torch.Tensor], params: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
    """``store[name] += d loss / d params[name]`` (the graph is kept for the step's own backward)."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
    for name, g in zip(names, grads):
        if g is None:
            continue
        store[name] = g.detach() if name not in store else store[name] + g.detach()


def _all_reduce_sum(accelerator: Any, tensors: dict[str, torch.Tensor]) -> None:
    if accelerator.num_processes == 1 or not tensors:
        return
    import torch.distributed as dist

    for value in tensors.values():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)


def _current_gradients(params: dict[str, torch.Tensor], clone: bool) -> dict[str, torch.Tensor]:
    """name -> the parameter's gradient (after the window's backward: averaged over processes)."""
    return {n: (p.grad.detach().clone() if clone else p.grad.detach()) for n, p in params.items() if p.grad is not None}


def _add_in_place(params: dict[str, torch.Tensor], direction: dict[str, torch.Tensor], delta: float) -> None:
    """``p.grad += delta * direction`` (the gradient of the chosen alpha from the provisional one's)."""
    for name, d in direction.items():
        grad = params[name].grad
        if grad is not None:
            grad.add_(d.to(grad.dtype), alpha=delta)


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _replay_rng:
    """Run a block with the random state of a snapshot (the same dropout masks), restoring the state after."""

    def __init__(self, snapshot: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
        self.snapshot, self.device = snapshot, device
        self._fork: Any = None

    def __enter__(self) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.set_rng_state(self.snapshot[0])
        if self.snapshot[1] is not None:
            torch.cuda.set_rng_state(self.snapshot[1], self.device)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


# --------------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Distil (or fine-tune) a student with an alpha strategy on accelerate.

    Args:
        student: the student model (a causal LM returning ``.logits``); prepared here.
        teacher: the teacher, or None for plain SFT (``kd_weight`` must then be 0). Frozen here. Or a teacher
            source that is not a module: ``source(batch) -> arkd.losses.TopKTeacher`` (an
            ``arkd.teacher_cache.TeacherCache``), whose top-k log-probabilities replace the teacher's logits
            everywhere (the losses, the features, the rewards, the probe, validation); the loss must accept them
            (``arkd.losses.accepts_topk_teacher``).
        tokenizer: saved next to the final and best models.
        batches: a :class:`BatchStream` (or any iterator of batch dicts with ``state_dict``/``load_state_dict``).
        strategy: an ``arkd.policy.AlphaStrategy`` (or None for plain SFT).
        loss: the KD loss module with ``reduction="sum"`` (``takes_alpha`` True: ``loss(s, t, m, alpha=alpha)``);
            None for plain SFT.
        optimizer: the student's optimizer.
        scheduler: a learning-rate scheduler stepped once per optimizer step (or None).
        accelerator: an ``accelerate.Accelerator`` built with ``gradient_accumulation_steps=grad_accum``.
        config: a :class:`TrainerConfig`.
        reward: the reward of learning strategies (``arkd.reward.PairedReward`` or ``SameBatchReward``); needed when
            ``strategy.needs_reward``.
        probe: an ``arkd.policy.AlphaSignalProbe`` (None: no probe).
        validation_batches: a list of batch dicts for the validation loss (sharded over processes here).
        validation_examples: examples (with ``references``) for validation Rouge-L.
        predict_fn: ``(model, examples) -> list[str]``: greedy or sampled generations for Rouge-L, one per example.
            Under several processes every process calls it with all the examples and must get all the generations
            (the recipe's shares the rows over the processes: ``arkd.evaluation.sharding.generate_sharded``).
        score_fn: ``(predictions, references) -> float``: Rouge-L x 100.
        logger: a :class:`MetricsLogger` (None: one is created in ``output_dir`` on the main process).
        rollout: an ``arkd.rollout.RolloutSource`` that turns each dataset batch into the batch trained on (None: the
            dataset's responses, ``arkd.rollout.DatasetResponses``).
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
    ) -> None:
        if teacher is None and (config.kd_weight != 0 or loss is not None):
            raise ValueError("a KD run needs a teacher: set `teacher=...` (or use `loss=cross_entropy` for SFT).")
        if config.kd_weight == 0 and config.ce_weight == 0:
            raise ValueError("trainer.kd_weight and trainer.ce_weight are both 0: nothing to train.")
        if strategy is not None and strategy.needs_reward and reward is None:
            raise ValueError(f"{type(strategy).__name__} learns from rewards: set the `reward` config.")
        self.cfg = config
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.batches = batches
        self.strategy = strategy
        self.loss = loss.to(accelerator.device) if loss is not None else None
        self.reward = reward
        self.probe = probe
        # What the loss declares (arkd.losses' modules carry these class attributes; a schedule is an update()).
        self._loss_caps = {
            "takes_alpha": bool(getattr(loss, "takes_alpha", False)),
            "needs_target_ids": bool(getattr(loss, "needs_target_ids", False)),
            "has_schedule": callable(getattr(loss, "update", None)),
        }
        self._hidden_checked = False
        # A teacher source that is not a model (the teacher cache): it gives top-k log-probabilities per batch.
        self.teacher_source = None if teacher is None or isinstance(teacher, torch.nn.Module) else teacher
        if self.teacher_source is not None:
            _check_topk_support(loss, config)
        if config.fused_linear:
            from arkd.losses.modules import BidirectionalKLLoss
            from arkd.reward import SameBatchReward

            if not isinstance(loss, BidirectionalKLLoss):
                raise ValueError(
                    f"trainer.fused_linear=true computes the bidirectional KL from hidden states; the loss is "
                    f"{type(loss).__name__}: use loss=bidirectional_kl (policy=... sets alpha) or fused_linear=false."
                )
            if isinstance(reward, SameBatchReward):
                raise ValueError(
                    "reward=same_batch compares the student's logits before and after a step, which "
                    "trainer.fused_linear=true never builds: use reward=paired or trainer.fused_linear=false."
                )
        self._feature_options = dict(strategy.feature_options) if strategy is not None else {}
        # The next training batch, its device copy and its teacher logits, once a preview has peeked at it.
        self._next: tuple[Any, dict[str, torch.Tensor], torch.Tensor | None] | None = None
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
        if teacher is not None and self.teacher_source is None:
            self.teacher = prepare_teacher(accelerator, teacher)
        self.logger = logger or MetricsLogger(self.run_dir, enabled=self.is_main)
        accelerator.gradient_accumulation_steps = config.grad_accum
        self.rollout = self._bind_rollout(rollout if rollout is not None else DatasetResponses())
        self._rollout_seconds = 0.0  # the rollout's generation clock when the step began
        self._rollout_counts = [0.0, 0.0]  # the window's student share summed over sequences, sequences
        self.rollout_seconds_total = 0.0  # generation time of this fit() (the recipe's summary)

    def _bind_rollout(self, rollout: Any) -> Any:
        """Give the rollout source the models it generates with (the student as trained, unwrapped)."""
        from accelerate.utils import DistributedType

        acc, name = self.accelerator, type(rollout).__name__
        if rollout.generates and acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ValueError(
                f"{name} generates with the full student on every process, which {acc.distributed_type.value} "
                "shards: use DDP (launch/accelerate/multi_gpu_ddp.yaml) or rollout=none."
            )
        if rollout.generates and self.teacher_source is not None:
            raise ValueError(
                f"{name} trains on generated responses, whose teacher log-probabilities the teacher cache "
                "(teacher.cache_dir) does not hold: use the live teacher (teacher.cache_dir=null) or rollout=none."
            )
        if rollout.needs_validation and not (self.validation_batches and self.cfg.eval_interval > 0):
            raise ValueError(
                f"{name} adapts on the validation loss: set trainer.eval_interval > 0 and give validation data."
            )
        if rollout.tokenizer is None:
            rollout.configure(tokenizer=self.tokenizer, seed=0)
        teacher = self.accelerator.unwrap_model(self.teacher) if self.teacher is not None else None
        rollout.bind(
            student=acc.unwrap_model(self.student), teacher=teacher, device=acc.device, rank=acc.process_index,
            world_size=acc.num_processes,
        )  # fmt: skip
        return rollout

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_XXXXXXX/`` atomically (every process takes part; the main one writes)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        healthy = self.weights_finite() and self._skipped_share() <= self.cfg.max_skipped_fraction
        model_state = acc.get_state_dict(self.student)
        rng_states = pdist.gather_objects(ckpt.capture_rng_state())
        rollout_states = pdist.gather_objects(self.rollout.state_dict())  # one per process (its own buffer)
        path = None
        if self.is_main:
            config_file = self.run_dir / "config.yaml"
            config_text = config_file.read_text() if config_file.is_file() else None
            state = {
                "train": self.state.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "strategy": self.strategy.state_dict() if self.strategy is not None else None,
                "probe": self.probe.state_dict() if self.probe is not None else None,
                "loss": self.loss.state_dict() if self.loss is not None else None,
                "data": self.batches.state_dict(),
                "rollout": rollout_states,
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
        fresh = ckpt.optimizer_hyperparameters(self.optimizer)  # the config's, which an accepted change may have set
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        ckpt.apply_hyperparameters(self.optimizer, self.scheduler, fresh)
        if self.strategy is not None and state["strategy"] is not None:
            self.strategy.load_state_dict(state["strategy"])
        if self.probe is not None and state.get("probe"):
            self.probe.load_state_dict(state["probe"])
        if self.loss is not None and state.get("loss"):
            self.loss.load_state_dict(state["loss"])
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        rollout = state.get("rollout")
        if rollout is not None:
            if len(rollout) != self.accelerator.num_processes:
                raise ValueError(
                    f"the checkpoint holds the rollout state of {len(rollout)} process(es), this run has "
                    f"{self.accelerator.num_processes}; resume with the same number of processes"
                )
            self.rollout.load_state_dict(rollout[self.accelerator.process_index])
        self.state.load_state_dict(state["train"])
        rng = ckpt.read_rng_state(path, self.accelerator.process_index)
        if rng is not None:
            ckpt.restore_rng_state(rng)

    def weights_finite(self) -> bool:
        """Whether the student is healthy on every process (a collective): every parameter finite and its outputs on a
        probe input finite (:func:`arkd.checkpoint.model_problem`)."""
        acc = self.accelerator
        model = acc.unwrap_model(self.student)
        bad = ckpt.model_problem(model) is not None
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
            t_logits = self._teacher_logits(batch)
            s_logits = acc.unwrap_model(self.student)(**model_inputs(batch)).logits
            s, m = shift_for_next_token(s_logits, batch["loss_mask"].bool())
            targets = batch["input_ids"][:, 1:]
            sums[0] += F.cross_entropy(s[m].float(), targets[m], reduction="sum")
            if t_logits is not None:
                fkl, rkl = kl_sums(s, t_logits[:, :-1], m, self.cfg.temperature)
                sums[1] += fkl
                sums[2] += rkl
            sums[3] += m.sum()
        sums = acc.reduce(sums, reduction="sum")
        tokens = max(sums[3].item(), 1.0)
        row: dict[str, float] = {"val_loss": sums[0].item() / tokens}
        if self.teacher is not None or self.teacher_source is not None:
            row.update(val_fkl=sums[1].item() / tokens, val_rkl=sums[2].item() / tokens)
        if self.validation_examples and self.predict_fn is not None and self.score_fn is not None:
            # Every process calls predict_fn with every example; arkd's own shares the rows over the processes
            # (arkd.evaluation.sharding) and returns all of them, the same on every process.
            predictions = self.predict_fn(acc.unwrap_model(self.student), self.validation_examples)
            if len(predictions) != len(self.validation_examples):
                raise ValueError(
                    f"predict_fn returned {len(predictions)} predictions for {len(self.validation_examples)} "
                    "validation examples; expected one per example."
                )
            references = [list(example.references) for example in self.validation_examples]
            row["val_rougeL"] = float(self.score_fn(predictions, references))
        self.student.train()
        return row

    # ----------------------------------------------------------------------------------------------------------------
    # The step

    def _teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | TopKTeacher | None:
        """The teacher's logits ``[B, T, V]`` (eval mode, no_grad), its top-k ``[B, T, k]`` from a teacher source,
        or None without a teacher."""
        if self.teacher_source is not None:
            return self.teacher_source(batch)
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(**model_inputs(batch)).logits

    def _draw_window(self) -> list[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        """``grad_accum`` micro-batches on the device, each with its teacher logits if a preview already has them."""
        window = []
        for _ in range(self.cfg.grad_accum):
            batch = next(self.batches)
            train_batch = self.rollout.draw(batch, step=self.state.step + 1, max_steps=self.cfg.max_steps)
            share = train_batch.get("on_policy")
            if share is not None:
                self._rollout_counts[0] += float(share.sum())
            self._rollout_counts[1] += float(train_batch["input_ids"].shape[0])
            if self._next is not None and self._next[0] is batch:  # peeked by the last step's reward or probe
                _, device_batch, teacher_logits = self._next
                window.append((device_batch, teacher_logits))
            else:
                window.append(({k: v.to(self.accelerator.device) for k, v in train_batch.items()}, None))
            self._next = None
        return window

    def _peek_next(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The next training batch (on the device) and its teacher logits, kept for the next step."""
        if self._next is None:
            batch = self.batches.peek()
            train_batch = self.rollout.preview(batch, step=self.state.step + 2, max_steps=self.cfg.max_steps)
            device_batch = {k: v.to(self.accelerator.device) for k, v in train_batch.items()}
            self._next = (batch, device_batch, self._teacher_logits(device_batch))
        return self._next[1], self._next[2]

    def _kd(self, out: StepOutput, alpha: Any) -> torch.Tensor:
        """The KD term of a micro-batch, summed over counted tokens (alpha and target ids for the losses that declare
        them; from the final hidden states with ``trainer.fused_linear``)."""
        if self.cfg.fused_linear:
            weight, bias = self._output_layer()
            return fused_linear_bidirectional_kl(
                out.student_hidden, weight, out.teacher_logits, out.mask, student_bias=bias, alpha=alpha,
                temperature=self.loss.temperature, reduction="sum", chunk_size=self.loss.chunk_size,
            )  # fmt: skip
        extra: dict[str, Any] = {}
        if self._loss_caps["takes_alpha"]:
            extra["alpha"] = alpha
        if self._loss_caps["needs_target_ids"]:
            extra["target_ids"] = out.targets
        return self.loss(out.student_logits, out.teacher_logits, out.mask, **extra)

    def _output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's output layer (``lm_head``): its weight ``[V, H]`` and bias (or None)."""
        layer = self.accelerator.unwrap_model(self.student).get_output_embeddings()
        return layer.weight, getattr(layer, "bias", None)

    def _student_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The final hidden states ``[B, T, H]`` (the output layer's input), from a forward that keeps the logits of
        the last position only; checked once against those logits."""
        out = self.student(**model_inputs(batch), output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        if not self._hidden_checked:
            weight, bias = self._output_layer()
            with torch.no_grad():
                last = torch.nn.functional.linear(hidden[:, -1:], weight, bias)
            same = last.shape == out.logits.shape and torch.allclose(last.float(), out.logits.float(), 1e-3, 1e-3)
            if not same:
                raise ValueError(
                    "trainer.fused_linear: this model's last hidden state is not the input of its output layer "
                    "(get_output_embeddings); expected a causal LM whose hidden_states[-1] is final-normed, as GPT-2, "
                    "Llama and Qwen2 have. Set trainer.fused_linear=false."
                )
            self._hidden_checked = True
        return hidden

    def _loss_step(
        self,
        batch: dict[str, torch.Tensor],
        teacher_logits: torch.Tensor | None = None,
        choose_alpha: Callable[[Features], torch.Tensor | None] | None = None,
        *,
        want_kl: bool = False,
    ) -> StepOutput:
        """Forward one micro-batch: the loss to backpropagate and its named statistics (sums over counted tokens).

        Args:
            batch: a batch dict on the device.
            teacher_logits: the teacher's ``[B, T, V]`` logits when already computed (None: computed here).
            choose_alpha: ``features -> alpha`` (the strategy's decision for this micro-batch), or None.
            want_kl: compute the FKL / RKL sums for logging even without features.
        """
        cfg = self.cfg
        if teacher_logits is None:
            teacher_logits = self._teacher_logits(batch)
        rng = _rng_snapshot(self.accelerator.device)  # the dropout state of the student forward (legacy reward)
        m = batch["loss_mask"][:, 1:].bool()
        s = h = None
        if cfg.fused_linear:
            h = self._student_hidden(batch)[:, :-1]
        else:
            s, m = shift_for_next_token(
                self.student(**model_inputs(batch)).logits,
                batch["loss_mask"].bool(),
            )
        targets = batch["input_ids"][:, 1:]
        t = teacher_logits[:, :-1] if teacher_logits is not None else None
        loss = (s if s is not None else h).new_zeros((), dtype=torch.float32)
        out = StepOutput(loss=loss, student_logits=s, teacher_logits=t, mask=m, targets=targets, batch=batch, rng=rng)
        out.student_hidden = h
        out.tokens = int(m.sum())
        options = {"temperature": cfg.temperature, "mu": cfg.feature_mu, **self._feature_options}
        options["on_policy"] = batch.get("on_policy")
        if self.loss is not None and cfg.kd_weight != 0:
            if choose_alpha is not None:
                if h is not None:
                    weight, bias = self._output_layer()
                    out.features = compute_features_from_hidden(h.detach(), weight.detach(), t, m, bias=bias, **options)
                else:
                    out.features = compute_features(s.detach(), t, m, **options)
                out.alpha = choose_alpha(out.features)
            out.kd = self._kd(out, out.alpha)
            loss = loss + cfg.kd_weight * out.kd
            if out.features is not None:  # FKL / RKL per token are among the features already
                out.fkl, out.rkl = out.features.fkl.sum(), out.features.rkl.sum()
            elif want_kl and s is not None:
                out.fkl, out.rkl = kl_sums(s, t, m, cfg.temperature)
        if cfg.ce_weight != 0:
            if h is not None:  # the counted rows' logits only
                weight, bias = self._output_layer()
                counted = torch.nn.functional.linear(h[m], weight, bias)
            else:
                counted = s[m]
            out.ce = F.cross_entropy(counted.float(), targets[m], reduction="sum")
            loss = loss + cfg.ce_weight * out.ce
        out.loss = loss
        return out

    def _alpha_chooser(self, plan: _StepPlan, candidates: list[list[torch.Tensor]]):
        """``features -> alpha`` for this step's micro-batches: one decision per optimiser step at batch
        granularity (on the first micro-batch's features), one per micro-batch otherwise; the candidates of a
        reward step are collected in ``candidates`` (one list per decision)."""
        strategy = self.strategy
        if strategy is None:
            return None
        shared: list[torch.Tensor] = []

        def choose(features: Features) -> torch.Tensor:
            if strategy.chooses_after_gradient:  # provisional; replaced after the window's gradient is known
                return torch.tensor(_PROVISIONAL_ALPHA, device=features.device)
            if strategy.granularity == "batch" and shared:
                return shared[0]
            ctx = StepContext(
                features=features,
                progress=self.state.step / self.cfg.max_steps,
                step=self.state.step,
                candidates=plan.candidates,
            )
            alpha = torch.as_tensor(strategy.select(ctx), dtype=torch.float32, device=features.device)
            if plan.candidates:
                candidates.append([c.to(features.device) for c in strategy.candidate_actions()])
            shared.append(alpha)
            return alpha

        return choose

    def _plan(self) -> _StepPlan:
        """What this step computes besides the update: a reward (with how many candidates), a probe, a preview."""
        step, strategy = self.state.step + 1, self.strategy
        reward = strategy is not None and strategy.needs_reward and self.reward is not None and self.reward.due(step)
        k = int(self.reward.candidates) if reward else 0
        probe = self.probe is not None and strategy is not None and self.probe.due(step)
        after = strategy is not None and strategy.chooses_after_gradient
        batch_level = strategy is None or strategy.granularity == "batch"
        return _StepPlan(
            candidates=k,
            paired=reward and k >= 2,
            legacy=reward and k == 1,
            probe=probe,
            after=after,
            direction=after or probe or (reward and k >= 2 and batch_level),
            batch_level=batch_level,
        )

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over one accumulation window; returns the statistics to log."""
        acc, cfg = self.accelerator, self.cfg
        started = time.perf_counter()
        self._rollout_seconds, self._rollout_counts = self.rollout.generation_seconds, [0.0, 0.0]

        # accelerate syncs gradients (DDP) and lets the optimizer step on the window's last micro-batch only.
        acc.gradient_accumulation_steps, acc.step = cfg.grad_accum, 0
        plan = self._plan()
        if plan.needs_preview:
            self._check_preview_support()

        # 1. The window, and its counted tokens over all micro-batches and processes.
        window = self._draw_window()
        local_tokens = sum(int(b["loss_mask"][:, 1:].sum()) for b, _ in window)
        # the share of the window's positions that are padding (length-grouped batches keep it low)
        padding = torch.tensor(
            [sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b, _ in window),
             sum(int(b["attention_mask"].numel()) for b, _ in window)],
            device=acc.device,
        )  # fmt: skip
        global_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum").item())
        padding = acc.reduce(padding, reduction="sum")
        # Each process backpropagates sum / N_global; DDP averages gradients over processes and accelerate divides
        # by grad_accum, so both are multiplied back here: the result is the exact token mean of the global window.
        scale = acc.num_processes * cfg.grad_accum / max(global_tokens, 1)
        per_token = 1.0 / max(global_tokens, 1)  # the same normalisation for gradients taken with autograd.grad

        # 2. Forward and backward on each micro-batch (one alpha per optimiser step at batch granularity).
        log_now = (self.state.step + 1) % cfg.log_interval == 0 or self.state.step + 1 == cfg.max_steps
        sums = _Sums(acc.device)
        candidates: list[list[torch.Tensor]] = []
        choose = self._alpha_chooser(plan, candidates)
        params = as_params(acc.unwrap_model(self.student))
        direction: dict[str, torch.Tensor] = {}
        offsets: list[dict[str, torch.Tensor]] = []
        kept: list[StepOutput] = []
        alphas: list[torch.Tensor] = []
        batch_level = plan.batch_level
        for batch, teacher_logits in window:
            with acc.accumulate(self.student):
                out = self._loss_step(batch, teacher_logits, choose, want_kl=log_now or self.strategy is not None)
                sums.add(out)
                if out.alpha is not None:
                    alphas.append(_masked_alpha_values(out.alpha, out.mask))
                if plan.direction:  # dg/dalpha: the gradient of kd_weight * (sum FKL - sum RKL) / N
                    shift = self._kd(out, 1.0) - self._kd(out, 0.0)
                    _accumulate(direction, params, cfg.kd_weight * per_token * shift)
                if plan.paired and not batch_level and candidates:  # per-sequence / per-token candidates
                    for k, candidate in enumerate(candidates[-1]):
                        # a fresh evaluation at the applied alpha: the fast path's backward runs once per forward
                        diff = self._kd(out, candidate) - self._kd(out, out.alpha)
                        if len(offsets) <= k:
                            offsets.append({})
                        _accumulate(offsets[k], params, cfg.kd_weight * per_token * diff)
                acc.backward(out.loss * scale)
                kept.append(out.detached(keep_student=plan.legacy, keep_teacher=plan.needs_preview or plan.legacy))

        # 3. The window's gradient (unclipped), and a strategy that chooses after seeing it (greedy).
        for part in (direction, *offsets):
            _all_reduce_sum(acc, part)
        grads = _current_gradients(params, clone=plan.needs_preview)
        preview = None
        applied = alphas
        if plan.needs_preview:
            alpha = kept[0].alpha if batch_level or not alphas else torch.cat(alphas)
            preview = StepPreview(
                params,
                grads,
                step_preview_for(self.optimizer),
                alpha=alpha,
                direction=direction or None,
                max_grad_norm=cfg.max_grad_norm,
            )
        if plan.after:
            same = self._scorer([(o.batch, o.teacher_logits, o.mask) for o in kept])
            base = same()
            lookahead = lambda a: base - same(preview.params_at(float(a) - _PROVISIONAL_ALPHA))  # noqa: E731
            ctx = StepContext(
                features=kept[0].features,
                progress=self.state.step / cfg.max_steps,
                step=self.state.step,
                lookahead=lookahead,
            )
            chosen = float(self.strategy.select(ctx))
            _add_in_place(params, direction, chosen - _PROVISIONAL_ALPHA)
            grads = _current_gradients(params, clone=True)
            preview = StepPreview(
                params,
                grads,
                preview.update,
                alpha=torch.tensor(chosen),
                direction=direction,
                max_grad_norm=cfg.max_grad_norm,
            )
            applied = [torch.tensor([chosen])]

        # 4. Clip (previews keep their unclipped copy) and measure the gradient norm with or without clipping
        # (accelerate's clip_grad_norm_ knows FSDP and DeepSpeed; an infinite threshold only measures); a non-finite
        # loss or norm skips the step (counted) or stops with the statistics.
        totals = sums.reduced(acc)
        loss_value = totals["loss"] / max(global_tokens, 1)
        clip = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf
        grad_norm = acc.clip_grad_norm_(self.student.parameters(), clip)
        if grad_norm is None and grads:  # an engine that clips by itself (DeepSpeed): the local norm, for the check
            grad_norm = global_norm(grads)
        finite = math.isfinite(loss_value) and (grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm))))
        alpha_all = torch.cat(applied) if applied else None
        has_kl = self.loss is not None and (log_now or self.strategy is not None)
        row: dict[str, Any] = {
            "step": self.state.step + 1,
            "loss": loss_value,
            "kd": totals["kd"] / max(global_tokens, 1) if self.loss is not None else None,
            "ce": totals["ce"] / max(global_tokens, 1) if cfg.ce_weight != 0 else None,
            "fkl": totals["fkl"] / max(global_tokens, 1) if has_kl else None,
            "rkl": totals["rkl"] / max(global_tokens, 1) if has_kl else None,
            "alpha_mean": alpha_all.mean().item() if alpha_all is not None and alpha_all.numel() else None,
            "alpha_std": alpha_all.std(unbiased=False).item() if alpha_all is not None and alpha_all.numel() else None,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "padding_share": float(padding[0]) / max(float(padding[1]), 1.0),
        }
        if not finite:
            row.update(self._rollout_row())
            return self._skip(row, loss_value, global_tokens)

        # 5. Counterfactual measurements from the optimiser state before the step: paired reward and probe.
        reward_value = None
        extra: dict[str, Any] = {}
        if plan.paired or plan.probe:
            next_batch, next_teacher = self._peek_next()
            m_next = next_batch["loss_mask"][:, 1:].bool()
            held_out = self._scorer([(next_batch, next_teacher[:, :-1], m_next)])
            same = self._scorer([(o.batch, o.teacher_logits, o.mask) for o in kept])
            if plan.paired:
                reward_value = self._paired_reward(preview, held_out, same, candidates, offsets)
            if plan.probe:
                extra.update(self.probe.measure(preview, held_out, same))

        # 6. Optimizer and scheduler step (the gradients were clipped in 4).
        self.optimizer.step()
        if self.scheduler is not None and not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.skipped_in_a_row = 0
        self.state.tokens_seen += global_tokens
        if self._loss_caps["has_schedule"]:
            self.loss.update(row["kd"])  # losses with a schedule of their own (TAID) advance once per step

        # 7. The legacy same-batch reward: the applied action's improvement on its own micro-batches.
        if plan.legacy:
            reward_value = self._same_batch_reward(kept)

        row.update(
            reward=reward_value,
            lr=self._lr(),
            tokens_per_sec=global_tokens / max(time.perf_counter() - started, 1e-9),
            skipped_steps=self.state.skipped_steps,
            **extra,
        )
        row.update(self._rollout_row())
        if self.strategy is not None:
            # The strategy's own statistics (policy entropy, concentration, rewards, ...); the trainer's window-wide
            # alpha statistics and losses win.
            merged = {"step": row["step"], **self.strategy.last_log()}
            merged.update({k: v for k, v in row.items() if v is not None or k not in merged})
            row = merged
        row.setdefault("policy_entropy", None)
        return row

    def _rollout_row(self) -> dict[str, Any]:
        """``rollout_student_fraction`` (the student's share of the window's sequences, all processes) and
        ``rollout_seconds`` (this step's generation time, the slowest process), with the source's own statistics."""
        acc = self.accelerator
        counts = acc.reduce(torch.tensor(self._rollout_counts, device=acc.device, dtype=torch.float64), reduction="sum")
        spent = self.rollout.generation_seconds - self._rollout_seconds  # this step's generation (and previews)
        seconds = torch.tensor(spent, device=acc.device, dtype=torch.float64)
        if acc.num_processes > 1:
            seconds = acc.reduce(seconds, reduction="max")
        self.rollout_seconds_total += float(seconds)
        return {
            "rollout_student_fraction": float(counts[0]) / max(float(counts[1]), 1.0),
            "rollout_seconds": float(seconds),
            **self.rollout.last_log(),
        }

    def _skip(self, row: dict[str, Any], loss_value: float, global_tokens: int) -> dict[str, Any]:
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

    def _scorer(self, parts: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]) -> BatchScorer:
        temperature = self.cfg.temperature
        return BatchScorer(
            self.accelerator.unwrap_model(self.student),
            [p[0] for p in parts],
            [p[1] for p in parts],
            [p[2] for p in parts],
            lambda s, t, m: token_alignment(s, t, m, temperature=temperature),
            from_hidden=self.cfg.fused_linear,
        )

    def _paired_reward(
        self,
        preview: StepPreview,
        held_out: BatchScorer,
        same: BatchScorer,
        candidates: list[list[torch.Tensor]],
        offsets: list[dict[str, torch.Tensor]],
    ) -> float:
        """Score each candidate's previewed step on the held-out data, credit the policy, return the mean reward."""
        reward = self.reward
        scorer = held_out if reward.held_out == "next" else same
        equal_norm, preview.equal_norm = preview.equal_norm, bool(reward.equal_norm)
        try:
            base = scorer()
            if offsets:  # per-sequence / per-token candidates: their exact gradient differences
                scores = [scorer(preview.params_at(offset=offset)) for offset in offsets]
            else:  # one alpha per step: a shift along dg/dalpha
                scores = [scorer(preview.params_at(float(c) - preview.alpha_mean)) for c in candidates[0]]
        finally:
            preview.equal_norm = equal_norm
        rewards = reward.rewards(base, scores)
        self.strategy.update(rewards)
        return float(rewards.mean())

    def _same_batch_reward(self, kept: list[StepOutput]) -> float:
        """``D_before - D_after`` of each micro-batch under one dropout mask (the training forward's, replayed)."""
        acc, strategy, temperature = self.accelerator, self.strategy, self.cfg.temperature
        model = acc.unwrap_model(self.student)  # no DDP hooks: a plain forward on this process's batch
        per_batch, sums = [], torch.zeros(2, dtype=torch.float64)
        for out in kept:
            with torch.no_grad(), _replay_rng(out.rng, acc.device):
                s_after = model(**model_inputs(out.batch)).logits
            d_before = token_alignment(out.student_logits, out.teacher_logits, out.mask, temperature=temperature)
            d_after = token_alignment(s_after[:, :-1], out.teacher_logits, out.mask, temperature=temperature)
            gain = torch.where(out.mask, d_before - d_after, 0.0)
            per_batch.append(reduce_tokens(gain, out.mask, strategy.granularity))
            sums += torch.stack([gain.sum().double().cpu(), out.mask.sum().double().cpu()])
        sums = pdist.all_reduce_sum(sums)
        mean = float(sums[0] / sums[1].clamp_min(1))
        if strategy.granularity == "batch":
            strategy.update(torch.tensor(mean))
        else:
            strategy.update(per_batch)
        return mean

    def _check_preview_support(self) -> None:
        """Previews need the full parameters and their plain gradients on every process."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.scaler is not None:
            raise ValueError(
                "the step preview (greedy search, the alpha-signal probe, the paired reward) does not support fp16's "
                "gradient scaler: use trainer.precision=bf16 or no, or probe=off with reward=same_batch."
            )
        if acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ValueError(
                f"the step preview (greedy search, the alpha-signal probe, the paired reward) needs full parameters "
                f"and gradients on every process, which {acc.distributed_type.value} shards: use DDP "
                f"(launch/accelerate/multi_gpu_ddp.yaml), or probe=off with reward=same_batch."
            )

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
        if self.rollout.validates_at_start and self.state.step == 0:
            self._initial_validation()
        self.student.train()
        bar = progress_bar(
            total=cfg.max_steps,
            initial=self.state.step,
            desc=cfg.progress_desc,
            disable=not (self.is_main and cfg.progress),
        )
        with _StopSignals(announce=self.is_main) as signals:
            while self.state.step < cfg.max_steps:
                row = self.train_step()
                step = self.state.step
                # every probe and reward is logged (the report's alpha_signal block reads them all)
                measured = row.get("alpha_signal_slope") is not None or row.get("reward") is not None
                if step % cfg.log_interval == 0 or step == cfg.max_steps or measured:
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
            model = self.accelerator.unwrap_model(self.student)
            what = "weights" if ckpt.weights_problem(model) else "outputs on a probe input"
            return (
                f"the run failed: the student's {what} are not finite after step {state.step} (a diverged run; "
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

    def _initial_validation(self) -> None:
        """The validation before the first step, for a rollout source that adapts on it (logged as step 0)."""
        rng = ckpt.capture_rng_state()
        try:
            row = self.validate()
        finally:
            ckpt.restore_rng_state(rng)
        self.logger.log({"step": 0, "split": "validation", **row})
        self.rollout.observe_validation(row)

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
        self.rollout.observe_validation(row)
        score = row.get(self.cfg.best_metric)
        if score is None or not math.isfinite(score):
            return
        best = self.state.best_value
        if best is None or (score > best if self.cfg.best_mode == "max" else score < best):
            if self._save_model("best"):
                self.state.best_value, self.state.best_step = score, step


def _check_topk_support(loss: Any, config: TrainerConfig) -> None:
    """A top-k teacher (the teacher cache) works with the losses that have a top-k form, on the logits path."""
    from arkd.losses import accepts_topk_teacher

    if loss is not None and not accepts_topk_teacher(loss):
        raise ValueError(
            f"the teacher cache gives top-k log-probabilities, and {type(loss).__name__} needs the teacher's full "
            "logits: use loss=forward_kl, reverse_kl, bidirectional_kl, generalized_jsd or js_divergence, or the live "
            "teacher (teacher.cache_dir=null)."
        )
    if config.fused_linear:
        raise ValueError(
            "trainer.fused_linear=true needs the teacher's full logits (the fused kernel has no top-k form): set "
            "trainer.fused_linear=false with teacher.cache_dir, or use the live teacher (teacher.cache_dir=null)."
        )


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
# Small helpers (the distributed ones are in arkd.distributed)


def _masked_alpha_values(alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The alpha values that weighed counted tokens, flat (for the logged mean / std)."""
    alpha = alpha.detach().float()
    if alpha.dim() == 0:
        return alpha.reshape(1)
    if alpha.dim() == 1:
        return alpha[mask.any(dim=-1)] if alpha.shape[0] == mask.shape[0] else alpha
    return alpha[mask] if alpha.shape == mask.shape else alpha.reshape(-1)
