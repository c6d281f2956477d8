"""A fingerprint of the fused bidirectional KL paths: sha256 of the bytes of their values and gradients.

Computes ``arkd.losses.bidirectional_kl`` (eager chunks and, where ``torch.compile`` works on this machine, the compiled
kernels) and ``arkd.losses.fused_linear_bidirectional_kl`` (logits teacher and hidden-state teacher, with a bias) for a
few seeded inputs: masked and unmasked, the trainer's ``logits[:, :-1]`` layout, per-token alpha, alpha exactly 0 and
1, a temperature, ``-inf`` logits on one side and on both sides, and a NaN logit. Prints one sha256 per case and one
over all of them. A refactor of ``arkd/losses/fused`` that keeps the numerics to the bit prints the same lines before
and after (on the same machine, torch and thread count: the hashes are of floating-point bytes).

The generalized JSD's fused paths (``fused_generalized_jsd``, ``fused_linear_generalized_jsd``) are fingerprinted too,
in the eager modes.

Run: ``python scripts/fingerprint_fused.py`` (``--no-compiled`` skips the compiled path).
"""

from __future__ import annotations

import argparse
import hashlib

import torch

import arkd.losses as L


def _logits(shape, seed, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


def _hash(tensors) -> str:
    h = hashlib.sha256()
    for x in tensors:
        if x is None:
            h.update(b"none")
            continue
        x = x.detach().contiguous().cpu().reshape(-1)
        h.update(str((tuple(x.shape), x.dtype)).encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def _logits_cases():
    """``(name, student_full, teacher_full, slicer, mask, kwargs)``: inputs of ``bidirectional_kl``."""
    s, t = _logits((3, 12, 37), seed=1)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(2)) < 0.6
    alpha_tok = torch.rand(3, 11, generator=torch.Generator().manual_seed(3))
    shifted = lambda x: x[:, :-1]  # noqa: E731  the trainer's layout
    whole = lambda x: x  # noqa: E731
    yield "plain_mean", s, t, whole, None, dict(alpha=0.3)
    yield "shifted_masked_token_alpha_T", s, t, shifted, mask, dict(alpha=alpha_tok, temperature=1.7, reduction="sum")
    yield "alpha0_none", s, t, whole, None, dict(alpha=0.0, reduction="none")
    yield "alpha1_masked", s, t, shifted, mask, dict(alpha=1.0, reduction="mean")
    s64, t64 = _logits((2, 9, 23), seed=4, dtype=torch.float64)
    yield "float64_seq_alpha", s64, t64, whole, None, dict(alpha=torch.tensor([0.2, 0.9], dtype=torch.float64))
    sb, tb = _logits((2, 10, 29), seed=5, dtype=torch.bfloat16)
    yield "bf16_shifted", sb, tb, shifted, None, dict(alpha=0.6, temperature=2.0, reduction="sum")
    si, ti = _logits((2, 8, 19), seed=6)
    si[0, 1, 3] = ti[0, 1, 3] = float("-inf")  # both sides: contributes 0
    si[1, 2, 5] = float("-inf")  # student only: FKL is +inf
    ti[1, 4, 7] = float("-inf")  # teacher only: RKL is +inf
    yield "neg_inf_mix", si, ti, whole, None, dict(alpha=0.5, reduction="none")
    yield "neg_inf_alpha0", si, ti, whole, None, dict(alpha=0.0, reduction="none")
    yield "neg_inf_alpha1", si, ti, whole, None, dict(alpha=1.0, reduction="none")
    sn, tn = _logits((2, 8, 19), seed=7)
    sn[1, 3, 2] = float("nan")
    yield "nan_none", sn, tn, whole, None, dict(alpha=0.4, reduction="none")
    yield "nan_sum", sn, tn, whole, None, dict(alpha=0.4, reduction="sum")


def _run_logits_case(student_full, teacher_full, slicer, mask, kwargs, chunk_size, compiled, teacher_grad):
    s = student_full.clone().requires_grad_(True)
    t = teacher_full.clone().requires_grad_(teacher_grad)
    loss, fkl, rkl = L.bidirectional_kl(
        slicer(s), slicer(t), mask, chunk_size=chunk_size, compiled=compiled, return_components=True, **kwargs
    )
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(11), dtype=loss.dtype) + 0.5
    inputs = (s, t) if teacher_grad else (s,)
    grads = torch.autograd.grad(loss, inputs, upstream)
    return (loss, fkl, rkl, *grads)


def _linear_cases():
    g = torch.Generator().manual_seed(20)
    hidden = torch.randn(3, 14, 8, generator=g)
    weight = torch.randn(31, 8, generator=g) * 0.7
    bias = torch.randn(31, generator=g) * 0.1
    teacher = torch.randn(3, 14, 31, generator=g) * 2
    t_hidden = torch.randn(3, 14, 6, generator=g)
    t_weight = torch.randn(31, 6, generator=g)
    t_bias = torch.randn(31, generator=g) * 0.1
    mask = torch.rand(3, 14, generator=g) < 0.7
    alpha_tok = torch.rand(3, 14, generator=g)
    yield "lin_logits_mean", hidden, weight, None, dict(teacher_logits=teacher, alpha=0.3)
    yield "lin_logits_masked_bias_T", hidden, weight, bias, dict(teacher_logits=teacher, mask=mask, alpha=alpha_tok,
                                                                 temperature=1.5, reduction="sum")  # fmt: skip
    yield "lin_hidden_teacher", hidden, weight, bias, dict(teacher_hidden=t_hidden, teacher_weight=t_weight,
                                                           teacher_bias=t_bias, mask=mask, alpha=0.7)  # fmt: skip
    yield "lin_alpha0", hidden, weight, None, dict(teacher_logits=teacher, mask=mask, alpha=0.0)
    yield "lin_alpha1", hidden, weight, None, dict(teacher_logits=teacher, alpha=1.0, reduction="sum")
    t_inf = teacher.clone()
    t_inf[0, 2, 4] = float("-inf")
    yield "lin_teacher_neg_inf_alpha1", hidden, weight, None, dict(teacher_logits=t_inf, alpha=1.0)
    h_nan = hidden.clone()
    h_nan[1, 5, 2] = float("nan")
    yield "lin_nan", h_nan, weight, None, dict(teacher_logits=teacher, alpha=0.4)
    yield "lin_bf16", hidden.bfloat16(), weight.bfloat16(), None, dict(teacher_logits=teacher.bfloat16(), alpha=0.6)


def _run_linear_case(hidden, weight, bias, kwargs, chunk_size, compiled):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    loss = L.fused_linear_bidirectional_kl(h, w, student_bias=b, chunk_size=chunk_size, compiled=compiled, **kwargs)
    inputs = (h, w) if b is None else (h, w, b)
    grads = torch.autograd.grad(loss * 1.3, inputs)
    again = L.fused_linear_bidirectional_kl(h, w, student_bias=b, chunk_size=chunk_size, compiled=compiled, **kwargs)
    grads_one = torch.autograd.grad(again, inputs)  # the backward that passes the saved gradients as they are
    return (loss, *grads, *grads_one)


def _jsd_cases():
    """``(name, student_full, teacher_full, slicer, mask, kwargs)``: inputs of ``fused_generalized_jsd``."""
    s, t = _logits((3, 12, 37), seed=30)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(31)) < 0.6
    shifted = lambda x: x[:, :-1]  # noqa: E731  the trainer's layout
    whole = lambda x: x  # noqa: E731
    yield "jsd_plain", s, t, whole, None, dict(beta=0.5)
    yield "jsd_shifted_masked_T", s, t, shifted, mask, dict(beta=0.3, temperature=1.7, reduction="sum")
    yield "jsd_none", s, t, whole, None, dict(beta=0.8, reduction="none")
    si, ti = _logits((2, 8, 19), seed=32)
    si[0, 1, 3] = ti[0, 1, 3] = float("-inf")
    si[1, 2, 5] = float("-inf")
    yield "jsd_neg_inf", si, ti, whole, None, dict(beta=0.5, reduction="none")


def _run_jsd_case(student_full, teacher_full, slicer, mask, kwargs, chunk_size):
    s = student_full.clone().requires_grad_(True)
    t = teacher_full.clone().requires_grad_(True)
    loss = L.fused_generalized_jsd(slicer(s), slicer(t), mask, chunk_size=chunk_size, **kwargs)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(33), dtype=loss.dtype) + 0.5
    return (loss, *torch.autograd.grad(loss, (s, t), upstream))


def _run_linear_jsd(chunk_size):
    g = torch.Generator().manual_seed(34)
    hidden, weight = torch.randn(3, 14, 8, generator=g), torch.randn(31, 8, generator=g) * 0.7
    bias, teacher = torch.randn(31, generator=g) * 0.1, torch.randn(3, 14, 31, generator=g) * 2
    mask = torch.rand(3, 14, generator=g) < 0.7
    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    loss = L.fused_linear_generalized_jsd(h, w, teacher, mask, student_bias=b, beta=0.4, chunk_size=chunk_size)
    return (loss, *torch.autograd.grad(loss * 1.3, (h, w, b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compiled", action="store_true", help="skip the torch.compile path")
    args = parser.parse_args()
    torch.manual_seed(0)
    modes = [("eager", 5, False), ("eager_one_chunk", 10_000, False), ("eager_row_chunks", 1, False)]
    if not args.no_compiled:
        modes.append(("compiled", 5, True))
    lines = []
    for mode, chunk_size, compiled in modes:
        for name, s, t, slicer, mask, kwargs in _logits_cases():
            for teacher_grad in (False, True):
                out = _run_logits_case(s, t, slicer, mask, kwargs, chunk_size, compiled, teacher_grad)
                lines.append(f"{mode:16s} {name}{'+tgrad' if teacher_grad else ''} {_hash(out)}")
        for name, hidden, weight, bias, kwargs in _linear_cases():
            out = _run_linear_case(hidden, weight, bias, kwargs, chunk_size, compiled)
            lines.append(f"{mode:16s} {name} {_hash(out)}")
        if not compiled:  # the generalized JSD has an eager path only
            for name, s, t, slicer, mask, kwargs in _jsd_cases():
                lines.append(f"{mode:16s} {name} {_hash(_run_jsd_case(s, t, slicer, mask, kwargs, chunk_size))}")
            lines.append(f"{mode:16s} lin_jsd {_hash(_run_linear_jsd(chunk_size))}")
    from arkd.losses import fused

    kernels = fused.compiled_kernels()
    for line in lines:
        print(line)
    print(f"compiled kernels: {len(kernels)}; threads: {torch.get_num_threads()}; torch {torch.__version__}")
    print("all", hashlib.sha256("\n".join(lines).encode()).hexdigest())


if __name__ == "__main__":
    main()
