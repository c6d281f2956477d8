"""Step time of constant-alpha KD against the learned policy, on the same tiny models in one run, as ratios.

Three trainers share the teacher, the student's initial weights and the data:

- ``constant``: ``ConstantAlpha(0.5)`` (features are still computed: every strategy receives them);
- ``learned@K``: ``LearnedPolicy`` with the reward (one extra no-grad student forward + a policy update) every
  ``K`` steps, K = the default ``reward.interval`` (4) and K = 1.

Rounds of ``--steps`` optimizer steps are interleaved (constant, learned@default, learned@1, constant, ...) so that a
busy machine slows them alike; the per-step time of each variant is the median over rounds, and the script prints
``learned / constant`` for each interval. Target: at most 1.10 at the default interval.

    python scripts/bench_step.py                       # the tiny job's models (CPU)
    python scripts/bench_step.py --device cuda --teacher-layers 12 --teacher-width 768 --batch-size 16
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


def make_trainer(args, parts, strategy, reward_interval: int, out: Path):
    from accelerate import Accelerator

    from arkd.data import build_dataloader
    from arkd.losses import BidirectionalKLLoss
    from arkd.reward import alignment
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
        config=TrainerConfig(
            max_steps=10**9, reward_interval=reward_interval, log_interval=10**9, output_dir=str(out), progress=False
        ),
        reward_fn=alignment,
    )


def timed(trainer, steps: int, device: str) -> float:
    """Seconds per optimizer step over ``steps`` steps."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tiny job uses 1)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per round (a multiple of 4)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-width", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-width", type=int, default=64)
    parser.add_argument("--granularity", default="sequence", choices=["batch", "sequence", "token"])
    parser.add_argument("--default-interval", type=int, default=4, help="reward.interval of the shipped configs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import tempfile

    from arkd.policy import ConstantAlpha, LearnedPolicy

    parts = build(args)
    k = args.default_interval
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "constant": make_trainer(args, parts, ConstantAlpha(alpha=0.5), 1, Path(tmp) / "c"),
            f"learned@{k}": make_trainer(args, parts, LearnedPolicy(granularity=args.granularity), k, Path(tmp) / "d"),
            "learned@1": make_trainer(args, parts, LearnedPolicy(granularity=args.granularity), 1, Path(tmp) / "o"),
        }
        for trainer in variants.values():
            timed(trainer, args.warmup, args.device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, trainer in variants.items():
                times[name].append(timed(trainer, args.steps, args.device))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": args.device,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "teacher": f"{args.teacher_layers}x{args.teacher_width}",
        "student": f"{args.student_layers}x{args.student_width}",
        "granularity": args.granularity,
        "ms_per_step": {name: round(1000 * value, 2) for name, value in median.items()},
        "ratio_learned_default_interval": round(median[f"learned@{k}"] / median["constant"], 3),
        "ratio_learned_interval_1": round(median["learned@1"] / median["constant"], 3),
        "default_interval": k,
        "target_default_interval": 1.10,
    }
    for name, value in median.items():
        print(f"{name:>12}: {1000 * value:8.2f} ms/step (median of {args.rounds} rounds x {args.steps} steps)")
    ratio = result["ratio_learned_default_interval"]
    print(f"learned (reward every {k} steps) / constant: {ratio:.3f} (target <= 1.10)")
    print(f"learned (reward every step)   / constant: {result['ratio_learned_interval_1']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
