"""Step time of constant-alpha KD against the learned policy and the alpha-signal probe, on the same models, as ratios.

Trainers share the teacher, the student's initial weights and the data:

- ``constant``: ``ConstantAlpha(0.5)`` (features are still computed: every strategy receives them);
- ``learned``: ``LearnedPolicy`` with the one-step paired reward (``reward=paired``: ``reward.interval`` 8, 2
  candidates: one extra backward for dg/dalpha and 3 student forwards on the next batch every 8 steps, whose teacher
  logits the next step reuses), no probe;
- ``learned@16``: the same with a reward every 16 steps (half the updates, half the cost);
- ``learned+probe``: ``policy=learned reward=paired`` with its probe (the probe every 8 steps: 3 forwards on the next
  batch, 2 on the window);
- ``constant+probe``: the probe's own cost on a strategy that does not learn;
- ``learned/same_batch``: the legacy same-batch reward (one replayed forward every 4 steps), for comparison.

Rounds of ``--steps`` optimizer steps are interleaved so that a busy machine slows them alike; the per-step time of
each variant is the median over rounds; the script prints each ``variant / constant``. Target: learned / constant at
most 1.10 (aim 1.05).

    python scripts/bench_step.py                       # the tiny job's models (CPU)
    python scripts/bench_step.py --memory 50257 151936  # peak memory of a step: logits vs trainer.fused_linear
    python scripts/bench_step.py --device cuda --teacher-layers 12 --teacher-width 768 --batch-size 16
    python scripts/bench_step.py --rollout --teacher-layers 1 --batch-size 16  # cost per step of each rollout

``--rollout`` times one step of ``ConstantAlpha(0.5)`` under each ``rollout`` option (none, gkd at lmbda 0.5 and 1,
seqkd, distillm at a fixed probability of 0.5 and minillm_mix, all with ``--rollout-new-tokens`` new tokens) and
prints each ``variant / none`` with generation's share of the step. The benchmark's models are untrained, so they
rarely stop before ``--rollout-new-tokens``: the lengths, and so the costs, are the worst case of that setting.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch


def build(args: argparse.Namespace):
    from arkd.data import TokenizedDataset, TrainingCollator, synthetic_splits
    from arkd.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=args.vocab_size, corpus_size=2000, seed=0)
    rows = synthetic_splits(2000, 8, 8, seed=0)["train"]
    dataset = TokenizedDataset(rows, tokenizer, max_prompt_length=96, max_length=128)
    collate = TrainingCollator(tokenizer.pad_token_id)

    def model(layers: int, width: int, seed: int):
        return build_tiny_model(
            len(tokenizer), n_layer=layers, n_embd=width, n_head=max(1, width // 32), n_positions=128, seed=seed
        )

    teacher = model(args.teacher_layers, args.teacher_width, 1)
    student = model(args.student_layers, args.student_width, 2)
    return tokenizer, dataset, collate, teacher, student


def make_trainer(args, parts, strategy, reward, probe, out: Path, rollout=None):
    from accelerate import Accelerator

    from arkd.data import build_dataloader
    from arkd.losses import BidirectionalKLLoss
    from arkd.trainer import BatchStream, Trainer, TrainerConfig

    tokenizer, dataset, collate, teacher, student = parts
    student = copy.deepcopy(student)
    accelerator = Accelerator(cpu=args.device == "cpu", step_scheduler_with_optimizer=False)
    loader = build_dataloader(dataset, batch_size=args.batch_size, collate_fn=collate, seed=0, drop_last=True)
    return Trainer(
        student=student,
        teacher=copy.deepcopy(teacher),
        tokenizer=tokenizer,
        batches=BatchStream(loader),
        strategy=strategy,
        loss=BidirectionalKLLoss(reduction="sum"),
        optimizer=torch.optim.AdamW(student.parameters(), lr=1e-3),
        scheduler=None,
        accelerator=accelerator,
        config=TrainerConfig(max_steps=10**9, log_interval=10**9, output_dir=str(out), progress=False),
        reward=reward,
        probe=probe,
        rollout=rollout,
    )


def timed(trainer, steps: int, device: str, clock: str = "wall") -> float:
    """Seconds per optimizer step over ``steps`` steps (``clock="process"``: this process's CPU time, which a busy
    shared machine disturbs far less than the wall clock when torch runs one thread)."""
    now = time.process_time if clock == "process" else time.perf_counter
    if device == "cuda":
        torch.cuda.synchronize()
    start = now()
    for _ in range(steps):
        trainer.train_step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (now() - start) / steps


def _memory_child(vocab: int, fused: bool, learned: bool, args: argparse.Namespace) -> dict:
    """Peak resident memory of two training steps above the memory before the first step, at vocabulary ``vocab``,
    with the logits path or ``fused_linear``; ``learned``: the learned policy with the paired reward and the probe
    every step (their no-grad previews run full-logits forwards), else constant alpha."""
    import resource
    import tempfile

    from accelerate import Accelerator

    from arkd.data import TokenizedDataset, TrainingCollator, build_dataloader, synthetic_splits
    from arkd.losses import BidirectionalKLLoss
    from arkd.models import build_tiny_model, build_tiny_tokenizer
    from arkd.policy import AlphaSignalProbe, ConstantAlpha, LearnedPolicy
    from arkd.reward import PairedReward
    from arkd.trainer import BatchStream, Trainer, TrainerConfig

    torch.set_num_threads(args.threads)
    tokenizer = build_tiny_tokenizer(vocab_size=512, corpus_size=2000, seed=0)
    rows = synthetic_splits(400, 8, 8, seed=0)["train"]
    dataset = TokenizedDataset(rows, tokenizer, max_prompt_length=96, max_length=128)
    collate = TrainingCollator(tokenizer.pad_token_id)
    loader = build_dataloader(dataset, batch_size=args.memory_batch_size, collate_fn=collate, seed=0, rank=0,
                              world_size=1, drop_last=True)  # fmt: skip
    width = args.memory_width
    student = build_tiny_model(vocab, n_layer=2, n_embd=width, n_head=width // 32, n_positions=128, seed=2)
    teacher = build_tiny_model(vocab, n_layer=2, n_embd=width, n_head=width // 32, n_positions=128, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            student=student, teacher=teacher, tokenizer=tokenizer, batches=BatchStream(loader),
            strategy=LearnedPolicy() if learned else ConstantAlpha(), loss=BidirectionalKLLoss(reduction="sum"),
            optimizer=torch.optim.AdamW(student.parameters(), lr=1e-3), scheduler=None,
            accelerator=Accelerator(cpu=True), reward=PairedReward(interval=1) if learned else None,
            probe=AlphaSignalProbe(interval=1) if learned else None,
            config=TrainerConfig(max_steps=10, log_interval=10**9, output_dir=tmp, progress=False, fused_linear=fused),
        )  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(2):
            trainer.train_step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens = args.memory_batch_size * 127
    extra = round((peak - before) / 1024, 1)
    return {"vocab": vocab, "fused_linear": fused, "learned": learned, "extra_mib": extra, "tokens": tokens}


def memory(args: argparse.Namespace) -> None:
    import subprocess
    import sys

    results = []
    for vocab, learned, fused in ((v, w, f) for v in args.memory for w in (False, True) for f in (False, True)):
        if True:
            cmd = [sys.executable, __file__, "--memory-child", str(vocab), str(int(fused)), str(int(learned)),
                   "--memory-batch-size", str(args.memory_batch_size), "--threads", str(args.threads),
                   "--memory-width", str(args.memory_width)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            r = results[-1]
            path = "fused_linear" if fused else "logits"
            what = "learned + reward + probe" if learned else "constant alpha"
            print(f"V = {vocab:>6}, {what:>24}, {path:>12}: +{r['extra_mib']:8.1f} MiB peak ({r['tokens']} positions)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def rollouts(args: argparse.Namespace) -> None:
    """ms per step of each rollout option with a constant alpha, as ratios to rollout=none (see the docstring)."""
    import tempfile

    from arkd.policy import ConstantAlpha
    from arkd.rollout import DatasetResponses, DistiLLMRollout, GKDRollout, MiniLLMMixRollout, SeqKDRollout

    if args.clock is None:
        args.clock = "process" if args.device == "cpu" and args.threads == 1 else "wall"
    torch.set_num_threads(args.threads)
    parts = build(args)
    tokenizer, dataset = parts[0], parts[1]
    n = args.rollout_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        specs = {
            "none": DatasetResponses(),
            "gkd lmbda=0.5": GKDRollout(lmbda=0.5, max_new_tokens=n),
            "gkd lmbda=1": GKDRollout(lmbda=1.0, max_new_tokens=n),
            "seqkd": SeqKDRollout(max_new_tokens=n),
            "distillm p=0.5": DistiLLMRollout(init_probability=0.5, max_new_tokens=n),
            "minillm_mix": MiniLLMMixRollout(max_new_tokens=n),
        }
        specs["distillm p=0.5"].needs_validation = False  # p stays 0.5 here: no validation to adapt on
        variants = {}
        for i, (name, rollout) in enumerate(specs.items()):
            rollout.configure(
                tokenizer=tokenizer, seed=0, max_length=128, cache_dir=Path(tmp) / "cache",
                train_prompts=[item.prompt_ids for item in dataset.items],
            )  # fmt: skip
            variants[name] = make_trainer(
                args, parts, ConstantAlpha(alpha=0.5), None, None, Path(tmp) / str(i), rollout
            )
        for trainer in variants.values():
            timed(trainer, args.warmup, args.device, args.clock)
        times: dict[str, list[float]] = {name: [] for name in variants}
        generation: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, trainer in variants.items():
                before = trainer.rollout.generation_seconds
                start = time.perf_counter()
                times[name].append(timed(trainer, args.steps, args.device, args.clock))
                wall = time.perf_counter() - start
                generation[name].append((trainer.rollout.generation_seconds - before) / max(wall, 1e-9))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(
            f"{name:>16}: {1000 * value:8.2f} ms/step  x{value / median['none']:.2f} of none, generation "
            f"{100 * statistics.median(generation[name]):.0f}% of the wall time (median of {args.rounds} rounds x "
            f"{args.steps} steps, {args.clock} clock, batch {args.batch_size}, {n} new tokens)"
        )
    if args.json is not None:
        result = {"ms_per_step": {k: round(1000 * v, 2) for k, v in median.items()}, "new_tokens": n}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tiny job uses 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per round (a multiple of 8)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-width", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-width", type=int, default=64)
    parser.add_argument("--granularity", default="batch", choices=["batch", "sequence", "token"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--clock",
        default=None,
        choices=["wall", "process"],
        help="wall clock, or this process's CPU time (default: process on the CPU with one thread, wall otherwise)",
    )
    parser.add_argument(
        "--memory",
        type=int,
        nargs="*",
        default=None,
        help="measure the peak memory of a step at these vocabulary sizes instead of timing",
    )
    parser.add_argument("--memory-width", type=int, default=256, help="hidden size of the --memory models")
    parser.add_argument("--memory-batch-size", type=int, default=8, help="batch size of the --memory steps")
    parser.add_argument("--memory-child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rollout", action="store_true", help="time the rollout options instead (see above)")
    parser.add_argument("--rollout-new-tokens", type=int, default=32, help="rollout.max_new_tokens of --rollout")
    args = parser.parse_args()
    if args.memory_child is not None:
        vocab, fused, learned = (int(x) for x in args.memory_child)
        print(json.dumps(_memory_child(vocab, bool(fused), bool(learned), args)))
        return
    if args.memory:
        memory(args)
        return
    if args.rollout:
        rollouts(args)
        return
    if args.clock is None:
        args.clock = "process" if args.device == "cpu" and args.threads == 1 else "wall"
    torch.set_num_threads(args.threads)

    import tempfile

    from arkd.policy import AlphaSignalProbe, ConstantAlpha, LearnedPolicy
    from arkd.reward import PairedReward, SameBatchReward

    parts = build(args)

    def learned():
        return LearnedPolicy(granularity=args.granularity)

    with tempfile.TemporaryDirectory() as tmp:
        specs = {
            "constant": (ConstantAlpha(alpha=0.5), None, None),
            "learned": (learned(), PairedReward(), None),
            "learned@16": (learned(), PairedReward(interval=16), None),
            "learned+probe": (learned(), PairedReward(), AlphaSignalProbe()),
            "constant+probe": (ConstantAlpha(alpha=0.5), None, AlphaSignalProbe()),
            "learned/same_batch": (learned(), SameBatchReward(), None),
        }
        variants = {
            name: make_trainer(args, parts, strategy, reward, probe, Path(tmp) / str(i))
            for i, (name, (strategy, reward, probe)) in enumerate(specs.items())
        }
        for trainer in variants.values():
            timed(trainer, args.warmup, args.device, args.clock)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, trainer in variants.items():
                times[name].append(timed(trainer, args.steps, args.device, args.clock))
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: round(value / median["constant"], 3) for name, value in median.items()}
    result = {
        "device": args.device,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "teacher": f"{args.teacher_layers}x{args.teacher_width}",
        "student": f"{args.student_layers}x{args.student_width}",
        "granularity": args.granularity,
        "clock": args.clock,
        "ms_per_step": {name: round(1000 * value, 2) for name, value in median.items()},
        "ratio_to_constant": ratios,
        "target_learned": 1.10,
    }
    for name, value in median.items():
        print(
            f"{name:>20}: {1000 * value:8.2f} ms/step  x{ratios[name]:.3f} of constant "
            f"(median of {args.rounds} rounds x {args.steps} steps, {args.clock} clock)"
        )
    print(f"learned (paired reward) / constant: {ratios['learned']:.3f} (target <= 1.10, aim 1.05)")
    print(f"probe's own cost: constant+probe / constant = {ratios['constant+probe']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
