"""Peak memory of one smollm2_dolly training step: plain, with gradient checkpointing, with LoRA, with both.

    python scripts/smollm2_memory.py                      # every set-up, each in a fresh process
    python scripts/smollm2_memory.py --setup lora --rows 4 --length 320

Each set-up runs in its own process (peak RSS only grows): it builds the smollm2_dolly teacher and pruned student as
``arkd-train config=smollm2_dolly`` does (the GGUF and student caches of ``$ARKD_CACHE``), takes the batch of the
``--rows`` longest chat-templated training rows (cut to ``--length`` tokens; the job's batch is 4 rows of at most 320),
and runs one step: the teacher's forward under no_grad, the student's forward, ARKD's bidirectional KL at alpha 0.5,
the backward pass and an AdamW step. It prints the peak resident memory of the step above the memory held before it
(models with every weight paged in, data: the same in every set-up), the step's loss and its wall time. On a CPU the
peak RSS is what the step needs from the machine; on a GPU use torch.cuda.max_memory_allocated instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SETUPS = ("plain", "checkpointing", "lora", "lora+checkpointing")


def _rss_mib() -> float:
    """The process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_one(setup: str, rows: int, length: int) -> dict:
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from arkd.config_paths import config_dir
    from arkd.data import TokenizedDataset, TrainingCollator, shift_for_next_token
    from arkd.data.template import apply_template
    from arkd.losses import bidirectional_kl
    from arkd.models import enable_gradient_checkpointing
    from arkd.recipes.build import build_model

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        overrides = ["config=smollm2_dolly", "output_dir=unused"]
        if "lora" in setup:
            overrides += ["+model.lora.r=8", "+model.lora.alpha=16"]
        cfg = compose(config_name="train", overrides=overrides)
    tokenizer = instantiate(cfg.tokenizer)
    splits = apply_template(instantiate(cfg.data.splits), tokenizer, "chat")
    teacher = build_model(cfg.teacher, tokenizer).eval()
    student = build_model(cfg.model, tokenizer).train()
    if "checkpointing" in setup:
        enable_gradient_checkpointing(student)
    dataset = TokenizedDataset(splits["train"], tokenizer, max_prompt_length=288, max_length=length, add_bos=False)
    items = sorted(
        (dataset[i] for i in range(len(dataset))), key=lambda item: -len(item["prompt_ids"]) - len(item["response_ids"])
    )[:rows]
    batch = TrainingCollator(tokenizer.pad_token_id)(items)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():  # every weight paged in (safetensors maps them lazily) before the baseline is taken
        teacher(input_ids=batch["input_ids"][:1, :8])
        student(input_ids=batch["input_ids"][:1, :8])
    before = _current_mib()
    started = time.perf_counter()
    with torch.no_grad():
        t_logits = teacher(**inputs).logits
    s_logits = student(**inputs).logits
    s, mask = shift_for_next_token(s_logits, batch["loss_mask"])
    loss = bidirectional_kl(s, t_logits[:, :-1], mask, alpha=0.5)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return {
        "setup": setup,
        "rows": rows,
        "tokens": int(batch["attention_mask"].sum()),
        "width": int(batch["input_ids"].shape[1]),
        "trainable_parameters": trainable,
        "held_before_step_mib": round(before, 1),
        "step_peak_above_held_mib": round(_rss_mib() - before, 1),
        "loss": round(float(loss.detach()), 5),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=SETUPS, default=None, help="one set-up (default: all, one process each)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=320)
    args = parser.parse_args()
    if args.setup is not None:
        print(json.dumps(run_one(args.setup, args.rows, args.length)))
        return
    results = []
    for setup in SETUPS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--setup", setup, "--rows", str(args.rows)]
        out = subprocess.run(cmd + ["--length", str(args.length)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{setup}: {out.stderr.strip().splitlines()[-1]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    plain = results[0]["step_peak_above_held_mib"]
    print("\n| set-up | trainable parameters | step peak above held (MiB) | vs plain | loss | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = r["step_peak_above_held_mib"] / plain if plain else float("nan")
        print(f"| {r['setup']} | {r['trainable_parameters']:,} | {r['step_peak_above_held_mib']:.0f} | {ratio:.2f} | "
              f"{r['loss']:.4f} | {r['seconds']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
