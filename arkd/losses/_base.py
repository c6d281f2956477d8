"""Shared argument checks, the masked reduction and the vocabulary helper of :mod:`arkd.losses`.

Everything here imports only torch, so ``import arkd.losses`` stays light.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "sum", "mean")


def check_reduction(reduction: str) -> None:
    """Raise a ``ValueError`` unless ``reduction`` is one of ``"none"``, ``"sum"``, ``"mean"``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_temperature(temperature: float) -> None:
    """Raise a ``ValueError`` unless ``temperature`` is a finite number > 0."""
    if not isinstance(temperature, (int, float)) or not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_alpha(alpha: object) -> None:
    """A float alpha must be in [0, 1]; a tensor alpha must hold only values in [0, 1] (NaN refused too)."""
    if not isinstance(alpha, torch.Tensor):
        check_unit_interval("alpha", alpha)
        return
    values = alpha.detach()
    bad = ~((values >= 0) & (values <= 1))  # NaN is neither
    if bool(bad.any()):
        first = float(values[bad].reshape(-1)[0])
        raise ValueError(f"alpha must hold values in [0, 1]; the tensor holds {first!r} ({int(bad.sum())} entries out)")


def check_unit_interval(name: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    """Raise a ``ValueError`` unless ``value`` is a number in [0, 1] (ends excluded where asked)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    low_ok = value > 0.0 if open_low else value >= 0.0
    high_ok = value < 1.0 if open_high else value <= 1.0
    if not (low_ok and high_ok):
        interval = ("(" if open_low else "[") + "0, 1" + (")" if open_high else "]")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Check the common argument convention and return the mask as a bool tensor (or None).

    Args:
        student_logits: ``[..., V]`` floating point.
        teacher_logits: ``[..., V]`` with the same shape.
        mask: ``[...]`` (bool, or 0/1 integers), True = counted; or None (everything counted).

    Returns:
        The mask as ``torch.bool`` on the logits' device, or None.

    Raises:
        ValueError: mismatched vocabulary sizes (naming both), mismatched token shapes or a mask of the wrong shape.
    """
    if not torch.is_floating_point(student_logits) or not torch.is_floating_point(teacher_logits):
        raise ValueError(
            "logits must be floating point tensors, got student "
            f"{student_logits.dtype} and teacher {teacher_logits.dtype}"
        )
    if student_logits.dim() == 0 or teacher_logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary, last)")
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs != vt:
        raise ValueError(
            f"student_logits has vocabulary size {vs} but teacher_logits has vocabulary size {vt}; slice both to a "
            "common size with arkd.losses.truncate_to_common_vocab (padded embedding matrices)"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must "
            "have the same shape [..., V]"
        )
    if mask is None:
        return None
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the logits' token shape is {tuple(student_logits.shape[:-1])}"
        )
    return mask.to(device=student_logits.device, dtype=torch.bool)


def zero_uncounted(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with every uncounted row set to 0 (``mask`` None: unchanged), before any math on them.

    The reduction's ``where`` keeps a NaN / inf of an uncounted row out of the value, but not out of the gradient:
    the backward of a log-softmax over a NaN row is NaN even with a zero upstream gradient (``0 * NaN``). Rows of
    zeros compute finite values, which the reduction drops, and ``where``'s backward sends exactly 0 to the rows it
    replaced.
    """
    if mask is None:
        return logits
    return torch.where(mask.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))


def masked_reduce(values: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Reduce per-token values over the counted tokens.

    Args:
        values: ``[...]`` per-token values.
        mask: ``[...]`` bool, True = counted; None counts every token.
        reduction: ``"none"`` returns ``values`` with uncounted tokens set to 0 (shape ``[...]``); ``"sum"`` the sum
            over counted tokens; ``"mean"`` that sum divided by the number of counted tokens. With no counted token
            ``"mean"`` and ``"sum"`` return 0, still connected to ``values`` in the autograd graph (never NaN).

    Returns:
        ``[...]`` for ``"none"``, a scalar otherwise.
    """
    check_reduction(reduction)
    if mask is not None:
        if mask.shape != values.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the values have shape {tuple(values.shape)}")
        mask = mask.to(device=values.device, dtype=torch.bool)
        # where (not multiply): a NaN/inf in an uncounted position must not leak into the result or its gradient.
        values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    count = values.numel() if mask is None else mask.sum()
    if isinstance(count, int):
        return total / max(count, 1)
    return total / count.clamp(min=1).to(total.dtype)


def truncate_to_common_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice both logits to a common vocabulary size (a view, no copy).

    Models often pad their embedding / output matrices beyond the tokenizer's vocabulary (Qwen-family models pad to a
    multiple of 128 or 256; GPT-2 variants to 50304), so a teacher and a student that share a tokenizer can return
    logits of different widths. The padded columns never correspond to a real token: dropping them is exact.

    Args:
        student_logits: ``[..., Vs]``.
        teacher_logits: ``[..., Vt]``.
        vocab_size: the size to keep (normally ``len(tokenizer)``); None keeps ``min(Vs, Vt)``.

    Returns:
        ``(student_logits[..., :V], teacher_logits[..., :V])``.

    Raises:
        ValueError: ``vocab_size`` is not a positive integer or exceeds either width.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        vocab_size = min(vs, vt)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size > min(vs, vt):
        raise ValueError(
            f"vocab_size {vocab_size} exceeds the logits' widths (student {vs}, teacher {vt}); it must be <= both"
        )
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


def broadcast_token_weight(name: str, value: float | torch.Tensor, token_shape: torch.Size, device) -> torch.Tensor:
    """Turn a float or a tensor into a constant ``[...]`` token-shaped float32/64 tensor.

    A tensor's dimensions are aligned with the LEADING dimensions of the token shape, so a per-sequence ``[B]`` value
    for ``[B, T]`` tokens means one value per sequence (not per position); ``[]``, ``[B, 1]`` and ``[B, T]`` work too.
    The result is detached: no gradient flows into it.
    """
    if not torch.is_tensor(value):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
        return torch.full(token_shape, float(value), dtype=torch.float64, device=device)
    value = value.detach().to(device)
    if not torch.is_floating_point(value):
        value = value.float()
    if value.dim() > len(token_shape):
        raise ValueError(f"{name} has shape {tuple(value.shape)}, more dimensions than the tokens {tuple(token_shape)}")
    value = value.reshape(tuple(value.shape) + (1,) * (len(token_shape) - value.dim()))
    try:
        return value.expand(token_shape)
    except RuntimeError:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)}, which does not broadcast to the token shape {tuple(token_shape)} "
            "(its dimensions align with the leading token dimensions: [], [B], [B, 1] or [B, T])"
        ) from None
