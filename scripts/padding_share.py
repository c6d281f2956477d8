"""Padding share of training batches on real rows: plain shuffling, length grouping, packing, and both.

    python scripts/padding_share.py                                  # Dolly's 1000 protocol validation rows
    python scripts/padding_share.py --tokenizer gpt2 --batch-size 8  # with a Hub (or local) tokenizer

Without ``--tokenizer`` a byte-level BPE is trained on the rows' own text (offline; at most 50257 tokens, it stops when
every word is one token: about 24.7k on Dolly's validation rows; not GPT-2's merges, so token counts are close to but
not GPT-2's). The batches come from ``arkd.data.build_dataloader``
with the trainer's collator, so the figures are what ``padding_share`` in ``metrics.jsonl`` would log. Prints per
set-up the padding share (padded positions / all positions), the rows per batch and the positions per batch (the
compute a forward pays for, attention aside).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from arkd.data import TokenizedDataset, TrainingCollator, build_dataloader, load_examples
from arkd.models import build_tiny_tokenizer

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dolly" / "minillm_dolly_valid1000.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT), help="a data file arkd.data.load_examples reads")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer name or directory (default: a local BPE)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--group", type=int, default=50, help="data.group_by_length for the grouped set-ups")
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    examples = load_examples(args.data)
    if args.tokenizer:
        from arkd.data import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, padding_side="right")
    else:
        texts = [t for e in examples for t in (e.prompt, *e.references)]
        tokenizer = build_tiny_tokenizer(texts, vocab_size=50257)
    dataset = TokenizedDataset(
        examples, tokenizer, max_prompt_length=args.max_prompt_length, max_length=args.max_length,
        overlong_prompt="drop",
    )  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(f"{len(dataset)} rows of {args.data}, {len(tokenizer)}-token tokenizer, batch size {args.batch_size}")
    print(f"{'set-up':<22} {'padding share':>14} {'rows/batch':>11} {'positions/batch':>16}")
    for name, group, pack in [
        ("shuffled", None, False),
        (f"grouped ({args.group})", args.group, False),
        ("packed", None, True),
        ("grouped + packed", args.group, True),
    ]:
        loader = build_dataloader(
            dataset, batch_size=args.batch_size, collate_fn=TrainingCollator(pad, pack=pack), seed=0, rank=0,
            world_size=1, drop_last=True, group_by_length=group,
        )  # fmt: skip
        padded = total = 0
        rows, positions = [], []
        for batch in loader:
            mask = batch["attention_mask"]
            padded += int(mask.numel() - mask.sum())
            total += int(mask.numel())
            rows.append(mask.shape[0])
            positions.append(mask.numel())
        print(
            f"{name:<22} {100 * padded / total:>13.1f}% {statistics.mean(rows):>11.2f} "
            f"{statistics.mean(positions):>16.0f}"
        )


if __name__ == "__main__":
    main()
