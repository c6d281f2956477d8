"""Which parts of a training run work together: one home for every combination arkd refuses.

Each check raises ``ValueError`` with one sentence naming what does not fit and what to set instead. The recipe calls
:func:`check_parts` from the config before any model is built (turning the error into a ``ConfigError``); the
:class:`arkd.trainer.Trainer` calls it again with the built objects, for code that builds a trainer by hand.
"""

from __future__ import annotations

from typing import Any

from arkd.losses import accepts_hidden_states, accepts_topk_teacher

__all__ = ["check_branches", "check_parts", "check_previews", "check_rollout"]

_GENERATING_ENGINES = ("DEEPSPEED", "FSDP")


def check_parts(
    *,
    loss: Any,
    teacher: bool = True,
    topk_teacher: bool = False,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    fused_linear: bool = False,
    reward_needs_student_logits: bool = False,
) -> None:
    """The loss, the teacher, the weights of the two terms and ``trainer.fused_linear`` fit together.

    Args:
        loss: the KD loss module (None: plain SFT).
        teacher: a teacher (a model or the teacher cache) is given.
        topk_teacher: the teacher is the teacher cache (top-k log-probabilities), not a model.
        kd_weight, ce_weight: ``trainer.kd_weight`` and ``trainer.ce_weight``.
        fused_linear: ``trainer.fused_linear`` (the KD term from hidden states).
        reward_needs_student_logits: the reward compares the student's logits (``reward=same_batch``).
    """
    if not teacher and (kd_weight != 0 or loss is not None):
        raise ValueError("a KD run needs a teacher: set `teacher=...` (or use `loss=cross_entropy` for SFT).")
    if kd_weight == 0 and ce_weight == 0:
        raise ValueError("trainer.kd_weight and trainer.ce_weight are both 0: nothing to train.")
    if topk_teacher and loss is not None and not accepts_topk_teacher(loss):
        raise ValueError(
            f"the teacher cache gives top-k log-probabilities, and {type(loss).__name__} needs the teacher's full "
            "logits: use loss=forward_kl, reverse_kl, bidirectional_kl, generalized_jsd or js_divergence, or the live "
            "teacher (teacher.cache_dir=null)."
        )
    if topk_teacher and fused_linear:
        raise ValueError(
            "trainer.fused_linear=true needs the teacher's full logits (the fused kernel has no top-k form): set "
            "trainer.fused_linear=false with teacher.cache_dir, or use the live teacher (teacher.cache_dir=null)."
        )
    if fused_linear and not accepts_hidden_states(loss):
        raise ValueError(
            f"trainer.fused_linear=true computes the KD loss from hidden states (bidirectional KL or generalized JSD); "
            f"the loss is {type(loss).__name__}: use loss=bidirectional_kl (policy=... sets alpha), "
            "loss=generalized_jsd or fused_linear=false."
        )
    if fused_linear and reward_needs_student_logits:
        raise ValueError(
            "reward=same_batch compares the student's logits before and after a step, which "
            "trainer.fused_linear=true never builds: use reward=paired or trainer.fused_linear=false."
        )


def check_rollout(
    rollout: Any,
    *,
    engine: str | None,
    topk_teacher: bool,
    validates: bool,
    name: str | None = None,
) -> None:
    """A rollout source (class or instance) fits the run.

    Args:
        rollout: the source (its class attributes ``generates`` and ``needs_validation`` are read).
        name: the config's name for it (``rollout=NAME`` in the message; None: the class's name).
        engine: accelerate's distributed type's name (``"DEEPSPEED"``, ``"FSDP"``, ...; None: not known yet).
        topk_teacher: the teacher is the teacher cache.
        validates: the run validates during training (validation data and ``trainer.eval_interval > 0``).
    """
    if name is not None:
        name = f"rollout={name}"
    else:
        name = rollout.__name__ if isinstance(rollout, type) else type(rollout).__name__
    if rollout.generates and engine in _GENERATING_ENGINES:
        raise ValueError(
            f"{name} generates with the full student on every process, which {engine} shards: use DDP "
            "(launch/accelerate/multi_gpu_ddp.yaml) or rollout=none."
        )
    if rollout.generates and topk_teacher:
        raise ValueError(
            f"{name} trains on generated responses, which the teacher cache (teacher.cache_dir) does not hold: use "
            "the live teacher (teacher.cache_dir=null) or rollout=none."
        )
    if rollout.needs_validation and not validates:
        raise ValueError(
            f"{name} adapts on the validation loss: set trainer.eval_interval > 0 (e.g. 60) and give validation data."
        )


def check_previews(*, engine: str | None, fp16_scaler: bool) -> None:
    """Step previews (greedy search, the alpha-signal probe, the paired reward) need the full parameters and their
    plain gradients on every process."""
    if fp16_scaler:
        raise ValueError(
            "the step preview (greedy search, the alpha-signal probe, the paired reward) does not support fp16's "
            "gradient scaler: use trainer.precision=bf16 or no, or probe=off with reward=same_batch."
        )
    if engine in _GENERATING_ENGINES:
        raise ValueError(
            f"the step preview (greedy search, the alpha-signal probe, the paired reward) needs full parameters "
            f"and gradients on every process, which {engine} shards: use DDP (launch/accelerate/multi_gpu_ddp.yaml), "
            "or probe=off with reward=same_batch."
        )


def check_branches(control: Any, *, reward_rows: int, engine: str | None = None) -> None:
    """The horizon reward and the horizon probe: one alpha per step, a reward split to score branches on, and the
    whole student and optimiser state on every process (the in-memory snapshots)."""
    horizon_probe = control.probe is not None and control.probe.horizon > 0
    if not (control.horizon or horizon_probe):
        return
    what = "reward=horizon" if control.horizon else "probe.horizon"
    if engine in _GENERATING_ENGINES:
        raise ValueError(
            f"{what} snapshots the student's parameters and optimiser state in memory and restores them for each "
            f"branch, which {engine} shards across processes: use DDP (launch/accelerate/multi_gpu_ddp.yaml), or "
            "reward=same_batch with probe.horizon=0."
        )
    if control.strategy.granularity != "batch":
        raise ValueError(
            f"{what} holds one alpha for whole branches of steps; policy.granularity={control.strategy.granularity} "
            "chooses one per sequence or token: use policy.granularity=batch."
        )
    if reward_rows == 0:
        raise ValueError(
            f"{what} scores its branches on a reward split (training rows no step trains on), and none was given: "
            "set reward.rows > 0 (arkd-train carves them from the training data)."
        )
