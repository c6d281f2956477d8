"""The loop's options (:class:`TrainerConfig`, the ``trainer`` config group's keys that the loop reads) and the
counters that survive a resume (:class:`TrainState`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainState", "TrainerConfig"]


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

    def advance(self, tokens: int) -> None:
        """An optimizer step was taken on ``tokens`` counted tokens."""
        self.step += 1
        self.skipped_in_a_row = 0
        self.tokens_seen += tokens

    def verdict(self, cfg: TrainerConfig, checkpoints: Path, unhealthy: str | None) -> str | None:
        """One sentence on why the finished run failed (``unhealthy``: what of the student is not finite, its
        ``weights`` or its ``outputs on a probe input``; too many skipped steps), or None."""
        from arkd import checkpoint as ckpt

        good = [p for _, p in ckpt.list_checkpoints(checkpoints) if ckpt.is_healthy(p)]
        keep = f"the last healthy checkpoint is {good[-1]}" if good else "no healthy checkpoint was kept"
        if unhealthy is not None:
            return (
                f"the run failed: the student's {unhealthy} are not finite after step {self.step} (a diverged run; "
                f"lower optimizer.lr or set trainer.max_grad_norm); final/ was not written and {keep}."
            )
        share = self.skipped_steps / max(self.step, 1)
        if share > cfg.max_skipped_fraction:
            return (
                f"the run failed: {self.skipped_steps} of {self.step} steps ({100 * share:.0f}%) were skipped for a "
                f"non-finite loss or gradient, more than trainer.max_skipped_fraction={cfg.max_skipped_fraction}; "
                f"final/ was not written and {keep}."
            )
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
