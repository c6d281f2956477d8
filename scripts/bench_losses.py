#!/usr/bin/env python
"""Benchmark the fast bidirectional KL paths against the naive autograd reference, in one run.

For ``--tokens`` x ``--vocab`` logits (default 4096 x 50257) this measures forward + backward time and peak extra
memory of

* ``naive``: two ``log_softmax`` and two ``F.kl_div`` under autograd (the reference);
* ``fast``: :func:`arkd.losses.bidirectional_kl` (chunked custom autograd Function);
* ``naive_linear``: the student logits computed as ``hidden @ weight.T`` and then the naive reference;
* ``fused_linear``: :func:`arkd.losses.fused_linear_bidirectional_kl` from the hidden states (no full student logits);

and prints each fast path as a ratio of its reference measured in the same invocation. ``--scaling`` adds the fused-
linear variant at 1/4, 1/2 and 1x the tokens to show that its peak extra memory does not grow with tokens x V.

Method. CPU: each variant runs in a fresh subprocess (so allocations of one cannot be reused by the next). Time is the
median wall-clock of ``--repeats`` forward + backward passes (after ``--warmup`` untimed ones; the CPU path has no
compilation or caching allocator to warm up, so the default is none). Peak extra memory is the process's
peak resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) during those passes minus its resident
size just before them, with the inputs already allocated; it includes the gradient returned to the student logits
(or hidden states and weight), which every variant must produce. PyTorch's CPU allocator hands large blocks straight
back to the OS, so the resident size tracks live tensors. CUDA (bf16): ``torch.cuda.max_memory_allocated`` minus the
allocated memory before the passes, and CUDA-synchronised wall-clock time.

Usage::

    python scripts/bench_losses.py                      # 4096 x 50257, fp32 CPU (+ bf16 CUDA when present)
    python scripts/bench_losses.py --tokens 1024 --repeats 1 --scaling --plot bench.png --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CPU_VARIANTS = ("naive", "fast", "naive_linear", "fused_linear")
REFERENCE = {"fast": "naive", "fused_linear": "naive_linear"}


# ------------------------------------------------------------------------------------------------------ memory probes
def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


# --------------------------------------------------------------------------------------------------------- variants
def _naive_loss(student_logits, teacher_logits, alpha, temperature):
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    fkl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    rkl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    return (alpha * fkl + (1.0 - alpha) * rkl).mean()


def _build(variant: str, tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, chunk_size: int):
    """Inputs and a closure computing the loss; returns (closure, tensors whose .grad to clear)."""
    from arkd.losses import bidirectional_kl, fused_linear_bidirectional_kl

    g = torch.Generator(device=device).manual_seed(0)
    teacher = (torch.randn(tokens, vocab, generator=g, device=device, dtype=torch.float32) * 2).to(dtype)
    alpha = torch.rand(tokens, generator=g, device=device)
    if variant in ("naive", "fast"):
        student = (torch.randn(tokens, vocab, generator=g, device=device, dtype=torch.float32) * 2).to(dtype)
        student.requires_grad_(True)
        if variant == "naive":
            return (lambda: _naive_loss(student, teacher, alpha, 1.0)), [student]
        return (lambda: bidirectional_kl(student, teacher, alpha=alpha, chunk_size=chunk_size)), [student]
    h = (torch.randn(tokens, hidden, generator=g, device=device, dtype=torch.float32)).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g, device=device, dtype=torch.float32) / hidden**0.5).to(dtype)
    w.requires_grad_(True)
    if variant == "naive_linear":
        return (lambda: _naive_loss(h @ w.T, teacher, alpha, 1.0)), [h, w]
    return (lambda: fused_linear_bidirectional_kl(h, w, teacher, alpha=alpha, chunk_size=chunk_size)), [h, w]


def run_variant(
    variant: str,
    tokens: int,
    vocab: int,
    hidden: int,
    repeats: int,
    warmup: int,
    dtype: str,
    device: str,
    chunk_size: int,
) -> dict:
    """Measure one variant in this process; returns times (s) and peak extra memory (MiB)."""
    torch.manual_seed(0)
    closure, leaves = _build(variant, tokens, vocab, hidden, getattr(torch, dtype), device, chunk_size)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024
    times, loss_value = [], None
    if cuda:
        warmup = max(warmup, 1)  # kernels' first-call set-up is not what we measure
    for i in range(warmup + repeats):
        for leaf in leaves:
            leaf.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = closure()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        loss_value = float(loss.detach())
        del loss
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {
        "variant": variant,
        "tokens": tokens,
        "vocab": vocab,
        "dtype": dtype,
        "device": device,
        "time_s": statistics.median(times),
        "peak_extra_mib": (peak - base) / 2**20,
        "loss": loss_value,
    }


def _spawn(args: argparse.Namespace, variant: str, tokens: int, dtype: str, device: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--tokens",
        str(tokens),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--chunk-size",
        str(args.chunk_size),
        "--dtype",
        dtype,
        "--device",
        device,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    by_key = {(r["variant"], r["tokens"], r["device"]): r for r in rows}
    lines = [
        "| device, dtype | variant | tokens x V | fwd+bwd time (s) | peak extra memory (MiB) "
        "| time vs ref | memory vs ref |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = by_key.get((REFERENCE.get(r["variant"], ""), r["tokens"], r["device"]))
        speed = f"{ref['time_s'] / r['time_s']:.2f}x faster" if ref else "reference"
        memory = f"{r['peak_extra_mib'] / ref['peak_extra_mib']:.2f}x" if ref else "reference"
        if not ref and r["variant"] in REFERENCE:
            speed = memory = "-"
        lines.append(
            f"| {r['device']}, {r['dtype']} | {r['variant']} | {r['tokens']} x {r['vocab']} | {r['time_s']:.3f} | "
            f"{r['peak_extra_mib']:.0f} | {speed} | {memory} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['device']} {r['variant'].replace('_', ' ')}\n{r['tokens']} tokens" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 1.3), 4))
    axes[0].bar(labels, [r["time_s"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("forward + backward time (s)")
    axes[1].bar(labels, [r["peak_extra_mib"] for r in rows], color="tab:orange")
    axes[1].set_ylabel("peak extra memory (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    fig.suptitle(f"bidirectional KL, V = {rows[0]['vocab']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the fused-linear variants")
    parser.add_argument("--repeats", type=int, default=2, help="timed forward + backward passes per variant")
    parser.add_argument("--warmup", type=int, default=0, help="untimed passes before them (CUDA: at least 1)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", default=None, help="worker only")
    parser.add_argument("--scaling", action="store_true", help="fused-linear at 1/4, 1/2, 1x tokens (CPU)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk_size is None:
        from arkd.losses.fused import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE

    if args.worker:
        device = args.device if args.device != "auto" else "cpu"
        result = run_variant(
            args.worker,
            args.tokens,
            args.vocab,
            args.hidden,
            args.repeats,
            args.warmup,
            args.dtype,
            device,
            args.chunk_size,
        )
        print(json.dumps(result))
        return

    from tqdm import tqdm

    jobs = []
    if args.device in ("auto", "cpu"):
        jobs += [(v, args.tokens, "float32", "cpu") for v in CPU_VARIANTS]
        if args.scaling:
            jobs += [("fused_linear", args.tokens // k, "float32", "cpu") for k in (4, 2)]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        jobs += [(v, args.tokens, "bfloat16", "cuda") for v in CPU_VARIANTS]
    rows = []
    for variant, tokens, dtype, device in tqdm(jobs, desc="variants", unit="run"):
        rows.append(_spawn(args, variant, tokens, dtype, device))
    settings = f"chunk_size={args.chunk_size}, hidden={args.hidden}, repeats={args.repeats}, warmup={args.warmup}"
    print(f"\n{settings}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print(_table(rows))
    for row in rows:
        ref = next((r for r in rows if r["variant"] == REFERENCE.get(row["variant"]) and r["tokens"] == row["tokens"]
                    and r["device"] == row["device"]), None)  # fmt: skip
        if ref is not None and abs(ref["loss"] - row["loss"]) > 1e-3 * max(1.0, abs(ref["loss"])):
            print(f"WARNING: {row['variant']} loss {row['loss']} differs from {ref['variant']} {ref['loss']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.plot:
        _plot(rows, args.plot)


if __name__ == "__main__":
    main()
