#!/usr/bin/env python
"""Benchmark ARKD's bidirectional KL against the losses a user would otherwise pick, all in one run, as ratios.

Two groups, each on shared inputs (fp32 on CPU, bf16 on CUDA), forward + backward:

* logits in (``--tokens`` x ``--vocab`` student and teacher logits, per-token alpha, ``reduction="mean"``):
  ``naive`` (two ``log_softmax`` and two ``F.kl_div`` under autograd), ``compiled_naive`` (``torch.compile`` of
  that function, the strongest plain-PyTorch peer), ``arkd_eager`` (:func:`arkd.losses.bidirectional_kl` with
  ``compiled=False``) and ``arkd`` (the default: the compiled chunk kernel at this size);
* fused linear, forward KL, teacher hidden states in (``--linear-tokens`` x hidden ``--hidden`` -> ``--vocab``):
  ``compiled_naive_linear`` (``torch.compile`` of ``h @ W.T`` + the naive FKL), ``liger`` (Liger-Kernel's
  ``LigerFusedLinearJSDLoss`` at ``beta=0``, i.e. KL(teacher || student), compiled as it ships; skipped with one line
  when ``liger-kernel`` is not installed, the ``bench`` extra) and ``arkd_linear``
  (:func:`arkd.losses.fused_linear_bidirectional_kl` at ``alpha=1``).

Method. Time: one subprocess per group builds the inputs once, makes each variant's first call (its compilation,
reported as "first call", in a fresh inductor cache unless ``--warm-cache``), then runs ``--repeats`` rounds that
each time every variant once, in turn, so a busy machine slows them alike. A peer's ratio is the median over rounds
of ``peer time / arkd time`` (> 1: arkd is faster). Memory: each variant runs in a fresh subprocess: one untimed call
(compilation), then the peak extra memory of one more forward + backward, i.e. the peak resident set size (``VmHWM``,
reset through ``/proc/self/clear_refs``) minus the resident size just before it, inputs allocated (CUDA:
``torch.cuda.max_memory_allocated`` minus the allocated memory before). It includes the gradient every variant must
return. Floors: the logits group's bytes floor is the time of ``torch.add(student, teacher, out=grad)`` on the same
tensors (it reads both logits once and writes one gradient-sized tensor: the fewest bytes any method moves); the
fused-linear group's floor is the time of its four matrix products alone (student and teacher logits, the hidden
and weight gradients), chunk by chunk. "x floor" is a variant's time over that.

Usage::

    python scripts/bench_losses.py                         # 4096 x 50257 logits, 2048-token fused linear (CPU)
    python scripts/bench_losses.py --tokens 1024 --linear-tokens 1024 --repeats 2 --json b.json --plot b.png
    python scripts/bench_losses.py --device cuda --markdown gpu.md  # bf16 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

GROUPS = {
    "logits": ("naive", "compiled_naive", "arkd_eager", "arkd"),
    "linear": ("compiled_naive_linear", "liger", "arkd_linear"),
}
ARKD = {"logits": "arkd", "linear": "arkd_linear"}


# ------------------------------------------------------------------------------------------------------ memory probes
def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def liger_available() -> bool:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or no usable triton
        return False
    return True


# --------------------------------------------------------------------------------------------------------- variants
def naive_loss(student_logits, teacher_logits, alpha):
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    fkl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    rkl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    return (alpha * fkl + (1.0 - alpha) * rkl).mean()


def naive_linear_fkl(hidden, weight, teacher_hidden, teacher_weight):
    log_q = F.log_softmax((hidden @ weight.T).float(), dim=-1)
    log_p = F.log_softmax((teacher_hidden @ teacher_weight.T).float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()


def build(group: str, variants, args, device: str, dtype: torch.dtype):
    """Shared inputs and one closure per variant: ({variant: closure}, leaves whose .grad to clear, floor closure)."""
    from arkd.losses import bidirectional_kl, fused_linear_bidirectional_kl

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

    if group == "logits":
        n, v = args.tokens, args.vocab
        student = randn(n, v, scale=2.0).requires_grad_(True)
        teacher = randn(n, v, scale=2.0)
        alpha = torch.rand(n, generator=g, device=device)
        compiled_naive = torch.compile(naive_loss)
        closures = {
            "naive": lambda: naive_loss(student, teacher, alpha),
            "compiled_naive": lambda: compiled_naive(student, teacher, alpha),
            "arkd_eager": lambda: bidirectional_kl(student, teacher, alpha=alpha, compiled=False),
            "arkd": lambda: bidirectional_kl(student, teacher, alpha=alpha),
        }
        out = torch.empty_like(student)

        def floor():
            torch.add(student.detach(), teacher, out=out)

        return {k: closures[k] for k in variants}, [student], floor

    n, v, h = args.linear_tokens, args.vocab, args.hidden
    hidden = randn(n, h).requires_grad_(True)
    weight = (randn(v, h) / h**0.5).requires_grad_(True)
    t_hidden = randn(n, h)
    t_weight = randn(v, h) / h**0.5
    closures = {}
    if "compiled_naive_linear" in variants:
        compiled = torch.compile(naive_linear_fkl)
        closures["compiled_naive_linear"] = lambda: compiled(hidden, weight, t_hidden, t_weight)
    if "liger" in variants:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0)
        labels = torch.zeros(n, dtype=torch.long, device=device)
        closures["liger"] = lambda: liger(hidden, weight, t_hidden, t_weight, labels)
    if "arkd_linear" in variants:
        closures["arkd_linear"] = lambda: fused_linear_bidirectional_kl(
            hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight, alpha=1.0
        )
    chunk = 1024
    buffers = [torch.empty(min(chunk, n), v, device=device, dtype=dtype) for _ in range(2)]
    g_h = torch.empty(min(chunk, n), h, device=device, dtype=dtype)
    g_w = torch.zeros(v, h, device=device, dtype=dtype)

    def floor():  # the four matrix products of a fused-linear loss, chunk by chunk
        with torch.no_grad():
            for start in range(0, n, chunk):
                rows = slice(start, min(start + chunk, n))
                c = rows.stop - rows.start
                s_logits, t_logits = buffers[0][:c], buffers[1][:c]
                torch.mm(hidden[rows], weight.T, out=s_logits)
                torch.mm(t_hidden[rows], t_weight.T, out=t_logits)
                torch.mm(s_logits, weight, out=g_h[:c])
                g_w.addmm_(s_logits.T, hidden[rows])

    return closures, [hidden, weight], floor


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _pass(closure, leaves, device: str) -> tuple[float, float]:
    """One forward + backward; returns (seconds, loss)."""
    for leaf in leaves:
        leaf.grad = None
    _sync(device)
    start = time.perf_counter()
    loss = closure()
    loss.backward()
    _sync(device)
    return time.perf_counter() - start, float(loss.detach())


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_memory(group: str, variant: str, args, device: str, dtype: torch.dtype) -> dict:
    """Peak extra memory (MiB) of one forward + backward of ``variant`` after an untimed first call."""
    closures, leaves, _ = build(group, (variant,), args, device, dtype)
    _pass(closures[variant], leaves, device)  # compilation / first-call set-up is not what we measure
    for leaf in leaves:
        leaf.grad = None
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024
    _, loss = _pass(closures[variant], leaves, device)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {"group": group, "variant": variant, "peak_extra_mib": (peak - base) / 2**20, "loss": loss}


def measure_time(group: str, variants, args, device: str, dtype: torch.dtype) -> dict:
    """First calls, then ``repeats`` interleaved rounds of every variant and the floor."""
    closures, leaves, floor = build(group, variants, args, device, dtype)
    first, losses = {}, {}
    for name in variants:
        first[name], losses[name] = _pass(closures[name], leaves, device)
    floor()
    times = {name: [] for name in (*variants, "floor")}
    for _ in range(args.repeats):
        for name in variants:
            seconds, losses[name] = _pass(closures[name], leaves, device)
            times[name].append(seconds)
        times["floor"].append(_timed(floor, device))
    return {"group": group, "first_call_s": first, "times": times, "losses": losses}


# ----------------------------------------------------------------------------------------------------------- driver
def _spawn(args: argparse.Namespace, mode: str, group: str, variants, device: str, dtype: str, env: dict) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--group", group, "--variants", ",".join(variants)]
    command += ["--tokens", str(args.tokens), "--linear-tokens", str(args.linear_tokens), "--vocab", str(args.vocab)]
    command += ["--hidden", str(args.hidden), "--repeats", str(args.repeats), "--device", device, "--dtype", dtype]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"benchmark worker {mode} {group} {variants} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(group: str, timing: dict, memory: dict[str, float]) -> list[dict]:
    """One row per variant: median time, ratio to arkd (median of per-round ratios), memory, floor multiple."""
    arkd = ARKD[group]
    times = timing["times"]
    floor = statistics.median(times["floor"])
    rows = []
    for name, values in times.items():
        if name == "floor":
            continue
        ratios = [p / a for p, a in zip(values, times[arkd])]
        rows.append(
            {
                "group": group,
                "variant": name,
                "time_s": statistics.median(values),
                "arkd_speedup": statistics.median(ratios),
                "peak_extra_mib": memory.get(name),
                "memory_vs_arkd": None if memory.get(name) is None else memory[name] / memory[arkd],
                "x_floor": statistics.median(values) / floor,
                "first_call_s": timing["first_call_s"][name],
                "loss": timing["losses"][name],
            }
        )
    rows.append({"group": group, "variant": "floor", "time_s": floor})
    return rows


def table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| variant | fwd+bwd (s) | arkd faster by | peak extra (MiB) | memory / arkd | x floor | first call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["variant"] == "floor":
            lines.append(f"| floor ({'bytes' if r['group'] == 'logits' else 'matmuls'}) | {r['time_s']:.3f} | "
                         "| | | 1.00 | |")  # fmt: skip
            continue
        arkd = r["variant"] == ARKD[r["group"]]
        speed = "—" if arkd else f"{r['arkd_speedup']:.2f}x"
        mem = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        mem_ratio = "—" if arkd or r["memory_vs_arkd"] is None else f"{r['memory_vs_arkd']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['time_s']:.3f} | {speed} | {mem} | {mem_ratio} | {r['x_floor']:.2f} | "
            f"{r['first_call_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUPS if any(r["group"] == g for r in rows)]
    fig, axes = plt.subplots(2, len(groups), figsize=(5.5 * len(groups), 6), squeeze=False)
    for col, group in enumerate(groups):
        rs = [r for r in rows if r["group"] == group and r["variant"] != "floor"]
        names = [r["variant"].replace("_", "\n") for r in rs]
        colors = ["tab:green" if r["variant"] == ARKD[group] else "tab:gray" for r in rs]
        axes[0][col].bar(names, [r["x_floor"] for r in rs], color=colors)
        axes[0][col].set_ylabel("time / floor (lower is better)")
        axes[0][col].set_title(f"{group}: time in floor units")
        axes[1][col].bar(names, [r["peak_extra_mib"] or 0 for r in rs], color=colors)
        axes[1][col].set_ylabel("peak extra memory (MiB)")
        for ax in axes[:, col]:
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the logits group")
    parser.add_argument("--linear-tokens", type=int, default=2048, help="tokens of the fused-linear group")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (student and teacher) of fused linear")
    parser.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--groups", default="logits,linear", help="comma-separated: logits, linear")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--warm-cache", action="store_true", help="reuse the on-disk inductor cache (first calls)")
    parser.add_argument("--json", default=None, help="write the rows and raw timings here")
    parser.add_argument("--markdown", default=None, help="write the tables here")
    parser.add_argument("--plot", default=None, help="write a PNG of time / floor and memory per variant")
    parser.add_argument("--worker", choices=("memory", "time"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--group", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        dtype = getattr(torch, args.dtype)
        variants = tuple(args.variants.split(","))
        if args.worker == "memory":
            result = measure_memory(args.group, variants[0], args, args.device, dtype)
        else:
            result = measure_time(args.group, variants, args, args.device, dtype)
        print(json.dumps(result))
        return

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    env = dict(os.environ)
    cache = None
    if not args.warm_cache:
        cache = tempfile.TemporaryDirectory(prefix="arkd-bench-inductor-")
        env["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise SystemExit(f"--groups: unknown {unknown}; choose from {sorted(GROUPS)}")
    notes = []
    all_rows, raw = [], {}
    out_text = []
    for group in groups:
        variants = list(GROUPS[group])
        if group == "linear" and not liger_available():
            variants.remove("liger")
            notes.append("liger: skipped (liger-kernel is not installed; pip install '.[bench]')")
            print(notes[-1], flush=True)
        print(f"[{group}] timing {', '.join(variants)} ...", flush=True)
        timing = _spawn(args, "time", group, variants, args.device, dtype, env)
        memory = {}
        if not args.no_memory:
            for variant in variants:
                print(f"[{group}] memory of {variant} ...", flush=True)
                memory[variant] = _spawn(args, "memory", group, [variant], args.device, dtype, env)["peak_extra_mib"]
        rows = summarise(group, timing, memory)
        raw[group] = {"timing": timing, "memory": memory}
        all_rows += rows
        if group == "logits":
            header = (
                f"**Logits in**: {args.tokens} tokens x V = {args.vocab}, {dtype}, per-token alpha, mean "
                f"({args.device}, {args.repeats} interleaved rounds)"
            )
        else:
            header = (
                f"**Fused linear, forward KL, teacher hidden states in**: {args.linear_tokens} tokens, hidden "
                f"{args.hidden} -> V = {args.vocab}, {dtype} ({args.device}, {args.repeats} interleaved rounds)"
            )
        out_text.append(table(rows, header))
        ref = timing["losses"][ARKD[group]]
        for name, value in timing["losses"].items():
            if abs(value - ref) > 1e-3 * max(1.0, abs(ref)):
                notes.append(f"WARNING: {group} {name} loss {value} != arkd {ref}")
    threads = torch.get_num_threads()
    settings = f"torch {torch.__version__}, {threads} CPU threads, arkd compiled kernel: chunk default"
    text = "\n\n".join([settings, *out_text, *notes])
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": all_rows, "raw": raw, "notes": notes}, indent=2))
    if args.plot:
        plot(all_rows, args.plot)
    if cache is not None:
        cache.cleanup()


if __name__ == "__main__":
    main()
