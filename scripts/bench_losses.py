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

Method. Memory: each variant runs one forward + backward in a fresh subprocess (so allocations of one cannot be
reused by the next); peak extra memory is the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) during that pass minus its resident size just before it, with the inputs already allocated.
It includes the gradient returned to the student logits (or hidden states and weight), which every variant must
produce. Time: one subprocess per fast path builds the inputs once and alternates passes of the reference and the fast
path (``--warmup`` untimed rounds, then ``--repeats`` timed ones), so both see the same load on a shared machine; the
speed-up is the median of the per-round ratios. PyTorch's CPU allocator hands large blocks straight
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

VARIANTS = ("naive", "fast", "naive_linear", "fused_linear")
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


def _build(variants, tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str, chunk_size: int | None):
    """Shared inputs and one closure per variant; returns ({variant: closure}, tensors whose .grad to clear)."""
    from arkd.losses import bidirectional_kl, fused_linear_bidirectional_kl

    g = torch.Generator(device=device).manual_seed(0)
    teacher = (torch.randn(tokens, vocab, generator=g, device=device, dtype=torch.float32) * 2).to(dtype)
    alpha = torch.rand(tokens, generator=g, device=device)
    if set(variants) <= {"naive", "fast"}:
        student = (torch.randn(tokens, vocab, generator=g, device=device, dtype=torch.float32) * 2).to(dtype)
        student.requires_grad_(True)
        closures = {
            "naive": lambda: _naive_loss(student, teacher, alpha, 1.0),
            "fast": lambda: bidirectional_kl(student, teacher, alpha=alpha, chunk_size=chunk_size),
        }
        return {v: closures[v] for v in variants}, [student]
    h = (torch.randn(tokens, hidden, generator=g, device=device, dtype=torch.float32)).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g, device=device, dtype=torch.float32) / hidden**0.5).to(dtype)
    w.requires_grad_(True)
    closures = {
        "naive_linear": lambda: _naive_loss(h @ w.T, teacher, alpha, 1.0),
        "fused_linear": lambda: fused_linear_bidirectional_kl(h, w, teacher, alpha=alpha, chunk_size=chunk_size),
    }
    return {v: closures[v] for v in variants}, [h, w]


def _pass(closure, leaves, cuda: bool) -> tuple[float, float]:
    """One forward + backward; returns (seconds, loss)."""
    for leaf in leaves:
        leaf.grad = None
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = closure()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, float(loss.detach())


def measure_memory(variant: str, tokens: int, vocab: int, hidden: int, dtype: str, device: str, chunk_size: int | None):
    """Peak extra memory (MiB) of one forward + backward of ``variant``, in this (fresh) process."""
    closures, leaves = _build((variant,), tokens, vocab, hidden, getattr(torch, dtype), device, chunk_size)
    cuda = device.startswith("cuda")
    if cuda:
        _pass(closures[variant], leaves, cuda)  # first-call set-up is not what we measure
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024
    _, loss = _pass(closures[variant], leaves, cuda)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {"variant": variant, "tokens": tokens, "peak_extra_mib": (peak - base) / 2**20, "loss": loss}


def measure_time(
    variant: str, tokens: int, vocab: int, hidden: int, repeats: int, warmup: int, dtype: str, device: str, chunk_size
):
    """Alternate passes of ``variant`` and its reference on the same inputs (so both see the same machine load)."""
    reference = REFERENCE[variant]
    closures, leaves = _build((reference, variant), tokens, vocab, hidden, getattr(torch, dtype), device, chunk_size)
    cuda = device.startswith("cuda")
    warmup = max(warmup, 1) if cuda else warmup
    times = {reference: [], variant: []}
    losses = {}
    for i in range(warmup + repeats):
        for name in (reference, variant):
            seconds, losses[name] = _pass(closures[name], leaves, cuda)
            if i >= warmup:
                times[name].append(seconds)
    ratios = [r / f for r, f in zip(times[reference], times[variant])]
    return {
        "variant": variant,
        "reference": reference,
        "tokens": tokens,
        "time_s": statistics.median(times[variant]),
        "reference_time_s": statistics.median(times[reference]),
        "speedup": statistics.median(ratios),
        "loss": losses[variant],
        "reference_loss": losses[reference],
    }


def _spawn(args: argparse.Namespace, mode: str, variant: str, tokens: int, dtype: str, device: str) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--variant", variant, "--tokens", str(tokens)]
    command += ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--repeats", str(args.repeats)]
    command += ["--warmup", str(args.warmup), "--dtype", dtype, "--device", device]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rows(memory: list[dict], timing: list[dict], device: str, dtype: str, vocab: int) -> list[dict]:
    """One row per (variant, tokens): time (from the paired runs), memory, ratios."""
    mem = {(m["variant"], m["tokens"]): m for m in memory}
    rows = []
    for m in memory:
        row = {"device": device, "dtype": dtype, "vocab": vocab, **m, "time_s": None, "speedup": None}
        row["memory_ratio"] = None
        for t in timing:
            if t["tokens"] == m["tokens"] and m["variant"] in (t["variant"], t["reference"]):
                row["time_s"] = t["time_s"] if m["variant"] == t["variant"] else t["reference_time_s"]
                row["speedup"] = t["speedup"] if m["variant"] == t["variant"] else None
        ref = mem.get((REFERENCE.get(m["variant"], ""), m["tokens"]))
        if ref is not None:
            row["memory_ratio"] = m["peak_extra_mib"] / ref["peak_extra_mib"]
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    lines = [
        "| device, dtype | variant | tokens x V | fwd+bwd time (s) | peak extra memory (MiB) "
        "| speed vs reference | memory vs reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        is_ref = r["variant"] not in REFERENCE
        time_s = "-" if r["time_s"] is None else f"{r['time_s']:.2f}"
        speed = "reference" if is_ref else ("-" if r["speedup"] is None else f"{r['speedup']:.2f}x faster")
        memory = "reference" if is_ref else ("-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x")
        lines.append(
            f"| {r['device']}, {r['dtype']} | {r['variant']} | {r['tokens']} x {r['vocab']} | {time_s} | "
            f"{r['peak_extra_mib']:.0f} | {speed} | {memory} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r: dict) -> str:
        return f"{r['device']} {r['variant'].replace('_', ' ')}\n{r['tokens']} tokens"

    timed = [r for r in rows if r["time_s"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, len(rows) * 1.3), 4))
    axes[0].bar([label(r) for r in timed], [r["time_s"] for r in timed], color="tab:blue")
    axes[0].set_ylabel("forward + backward time (s)")
    axes[1].bar([label(r) for r in rows], [r["peak_extra_mib"] for r in rows], color="tab:orange")
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
    parser.add_argument("--repeats", type=int, default=3, help="timed forward + backward passes per variant")
    parser.add_argument("--warmup", type=int, default=0, help="untimed passes before them (CUDA: at least 1)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--scaling", action="store_true", help="fused-linear memory at 1/4 and 1/2 of the tokens")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    parser.add_argument("--worker", choices=("memory", "time"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        device = "cpu" if args.device == "auto" else args.device
        shape = (args.tokens, args.vocab, args.hidden)
        if args.worker == "memory":
            result = measure_memory(args.variant, *shape, args.dtype, device, args.chunk_size)
        else:
            result = measure_time(args.variant, *shape, args.repeats, args.warmup, args.dtype, device, args.chunk_size)
        print(json.dumps(result))
        return

    from tqdm import tqdm

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(("cpu", "float32"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(("cuda", "bfloat16"))
    jobs = []
    for device, dtype in devices:
        jobs += [("memory", v, args.tokens, dtype, device) for v in VARIANTS]
        if args.scaling:
            jobs += [("memory", "fused_linear", args.tokens // k, dtype, device) for k in (4, 2)]
        jobs += [("time", v, args.tokens, dtype, device) for v in REFERENCE]
    results = {d: {"memory": [], "time": []} for d, _ in devices}
    for mode, variant, tokens, dtype, device in tqdm(jobs, desc="benchmark runs", unit="run"):
        results[device][mode].append(_spawn(args, mode, variant, tokens, dtype, device))
    rows = []
    for device, dtype in devices:
        rows += _rows(results[device]["memory"], results[device]["time"], device, dtype, args.vocab)
    from arkd.losses.fused import default_chunk_size

    chunks = ", ".join(f"{d}: {args.chunk_size or default_chunk_size(args.vocab, d)}" for d, _ in devices)
    settings = f"chunk_size ({chunks}), hidden={args.hidden}, repeats={args.repeats}, warmup={args.warmup}"
    print(f"\n{settings}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print(_table(rows))
    for device, _ in devices:
        for t in results[device]["time"]:
            if abs(t["loss"] - t["reference_loss"]) > 1e-3 * max(1.0, abs(t["reference_loss"])):
                print(f"WARNING ({device}): {t['variant']} loss {t['loss']} != reference {t['reference_loss']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "raw": results}, indent=2))
    if args.plot:
        _plot(rows, args.plot)


if __name__ == "__main__":
    main()
