"""Time a whole training step of TRL's GKDTrainer against ARKDGKDTrainer on the same models and batch.

Both trainers are the real ones (``trl.experimental.gkd.GKDTrainer`` with ``beta``; ``arkd.integrations.trl.
ARKDGKDTrainer`` with ``loss=GeneralizedJSDLoss(beta)``: the same maths), on random GPT-2 models (student
``--student-layers`` x ``--hidden``, teacher ``--teacher-layers`` x ``--hidden``) and one batch of ``--rows`` x
``--tokens`` (every response token counted). A step is the trainer's own ``training_step`` (forward, loss, backward:
GKD's ``lmbda = 0`` path) followed by ``optimizer.step()`` and ``zero_grad``. The variants run interleaved (A, B, A,
B, ...) in one process after one warm-up step each; the script prints each variant's median step time and the ratio
of medians. Peak memory: on CPU each variant runs two steps in a fresh subprocess and reports its peak RSS
(``VmHWM``, reset just before the first step) above the RSS before it (the models, the batch and the imports are the
baseline); on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before the step.

    nice -n 10 python scripts/bench_integrations.py                       # V = 50257 and 151936, fp32, CPU
    python scripts/bench_integrations.py --device cuda --dtype bf16       # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")

VARIANTS = ("trl", "arkd", "arkd-logits")


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process (Linux ``/proc/self/status``, kB) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Reset the peak RSS (``VmHWM``) to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``), so that the
    peak read after the steps is theirs, not the imports' or the models' construction's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(variant: str, args, workdir: str):
    """``(step, batch)``: one training step of ``variant`` on the shared models and batch."""
    import datasets
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from arkd.integrations.trl import ARKDGKDTrainer
    from arkd.losses import GeneralizedJSDLoss
    from arkd.models import build_tiny_tokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shape = dict(
        vocab_size=args.vocab, n_positions=args.tokens, n_embd=args.hidden, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    student = GPT2LMHeadModel(GPT2Config(n_layer=args.student_layers, **shape)).to(args.device, dtype)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=args.teacher_layers, **shape)).to(args.device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.rows, args.tokens), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    config = GKDConfig(
        output_dir=workdir, per_device_train_batch_size=args.rows, max_steps=10, learning_rate=1e-5, lmbda=0.0,
        beta=args.beta, report_to=[], save_strategy="no", use_cpu=args.device == "cpu", bf16=False, seed=0,
        disable_tqdm=True, max_grad_norm=1.0,
    )  # fmt: skip
    tokenizer = build_tiny_tokenizer(vocab_size=300, corpus_size=50)
    common = dict(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                  train_dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
                  data_collator=lambda rows: batch)  # fmt: skip
    if variant == "trl":
        trainer = GKDTrainer(**common)
    else:
        trainer = ARKDGKDTrainer(**common, loss=GeneralizedJSDLoss(beta=args.beta),
                                 fused_linear=None if variant == "arkd" else False)  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.current_gradient_accumulation_steps = 1
    trainer.state.max_steps = trainer.state.logging_steps = 1000  # no logging step: no FKL / RKL for the log
    model = trainer.model_wrapped
    on_device = {k: v.to(args.device) for k, v in batch.items()}
    num_items = trainer._get_num_items_in_batch([on_device], on_device["input_ids"].device)

    def step() -> float:
        inputs = dict(on_device)
        loss = trainer.training_step(model, inputs, num_items)
        trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if variant != "trl":
            trainer._arkd_after_step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    return step


def memory_child(variant: str, args) -> dict:
    """Run in a fresh process: two steps, the peak memory above the state before the first."""
    import torch

    with tempfile.TemporaryDirectory() as workdir:
        step = build(variant, args, workdir)
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = [step(), step()]
            peak = torch.cuda.max_memory_allocated()
        else:
            gc.collect()
            _reset_peak_rss()
            before = _status_bytes("VmRSS")
            loss = [step(), step()]
            peak = _status_bytes("VmHWM")
    return {"variant": variant, "peak_above_baseline": peak - before, "peak": peak, "loss": loss}


def _child_argv(variant: str, args) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--memory-child", variant]
    for key in ("vocab", "rows", "tokens", "hidden", "student_layers", "teacher_layers", "beta", "device", "dtype"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 151936])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--reps", type=int, nargs="+", default=[3, 2], help="timed steps per variant, per vocab")
    parser.add_argument("--variants", nargs="+", default=["trl", "arkd"], choices=VARIANTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        args.vocab = args.vocab[0]
        print(json.dumps(memory_child(args.memory_child, args)))
        return

    import torch

    print(f"torch {torch.__version__}, {args.device} ({torch.get_num_threads()} threads), {args.dtype}; student "
          f"{args.student_layers} x {args.hidden}, teacher {args.teacher_layers} x {args.hidden}; {args.rows} rows x "
          f"{args.tokens} tokens; GKD beta {args.beta}, lmbda 0")  # fmt: skip
    reps = list(args.reps) + [args.reps[-1]] * (len(args.vocab) - len(args.reps))
    for vocab, n in zip(args.vocab, reps):
        args_v = argparse.Namespace(**{**vars(args), "vocab": vocab})
        with tempfile.TemporaryDirectory() as workdir:
            steps = {v: build(v, args_v, workdir) for v in args.variants}
            losses = {v: steps[v]() for v in args.variants}  # warm-up (and the loss of the first step)
            times: dict[str, list[float]] = {v: [] for v in args.variants}
            for _ in range(n):
                for v in args.variants:
                    start = time.perf_counter()
                    steps[v]()
                    times[v].append(time.perf_counter() - start)
            del steps
        medians = {v: statistics.median(t) for v, t in times.items()}
        print(f"\nV = {vocab}: step time, median of {n} interleaved steps after one warm-up (first-step loss)")
        for v in args.variants:
            ts = ", ".join(f"{t:.2f}" for t in times[v])
            print(f"  {v:12s} {medians[v]:7.2f} s   [{ts}]   loss {losses[v]:.6f}")
        base = args.variants[0]
        for v in args.variants[1:]:
            print(f"  speed-up {v} vs {base}: {medians[base] / medians[v]:.2f}x")
        if args.no_memory:
            continue
        memory = {}
        for v in args.variants:
            out = subprocess.run(_child_argv(v, args_v), capture_output=True, text=True, check=True)
            memory[v] = json.loads(out.stdout.strip().splitlines()[-1])
        what = "max_memory_allocated" if args.device == "cuda" else "peak RSS"
        print(f"V = {vocab}: {what} of two steps in a fresh process, above the pre-step baseline (total)")
        for v in args.variants:
            m = memory[v]
            print(f"  {v:12s} {m['peak_above_baseline'] / 2**20:8.0f} MiB   ({m['peak'] / 2**20:.0f} MiB)")
        for v in args.variants[1:]:
            ratio = memory[v]["peak_above_baseline"] / max(memory[base]["peak_above_baseline"], 1)
            print(f"  peak-memory ratio {v} / {base}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
