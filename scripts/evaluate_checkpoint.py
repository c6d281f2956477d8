"""Evaluate one checkpoint on Dolly, S-NI and UnNI under the MiniLLM protocol in one command.

    python scripts/evaluate_checkpoint.py runs/train/ckpt --data-dir ../shared/data
    python scripts/evaluate_checkpoint.py MiniLLM/SFT-gpt2-120M --hub          # a connected machine: Hub datasets
    python scripts/evaluate_checkpoint.py CKPT --data-dir DATA --seeds 10 --max-rows 100 --no-bertscore

It composes ``configs/evaluate.yaml`` (the config of ``arkd-eval``) with the options below and runs the same code;
``--set key=value`` passes any other arkd-eval key. Results go to ``--output-dir`` (default ``runs/eval/<name>``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_overrides(args: argparse.Namespace) -> list[str]:
    """arkd-eval overrides for the parsed options."""
    overrides = [f"model_path={args.checkpoint}", f"datasets=[{','.join(args.datasets)}]"]
    if args.data_dir is not None:
        overrides.append(f"data_dir={args.data_dir}")
    if args.hub:
        overrides.append("hub.enabled=true")
    if args.seeds is not None:
        overrides.append(f"seeds=[{','.join(str(s) for s in args.seeds)}]")
    if args.max_rows is not None:
        overrides.append(f"max_rows={args.max_rows}")
    if args.batch_size is not None:
        overrides.append(f"batch_size={args.batch_size}")
    if args.label is not None:
        overrides.append(f"label={args.label}")
    if args.no_bertscore:
        overrides.append("bertscore.enabled=false")
    if args.bertscore_model is not None:
        overrides.append(f"bertscore.model_type={args.bertscore_model}")
    if args.bertscore_layer is not None:
        overrides.append(f"bertscore.num_layers={args.bertscore_layer}")
    if args.greedy:
        overrides.append("decoding.greedy=true")
    return overrides + list(args.set)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="model directory or Hub name")
    parser.add_argument("--data-dir", help="folder holding dolly/, sni/, unni/ (e.g. ../shared/data)")
    parser.add_argument("--hub", action="store_true", help="download missing files from the Hub (MiniLLM/*)")
    parser.add_argument("--datasets", nargs="+", default=["dolly", "sni", "unni"], help="names or JSONL paths")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 10 20 30 40 50")
    parser.add_argument("--max-rows", type=int, help="first N rows of every dataset (default: UnNI 10,000)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--label", help="the run's name in aggregate tables")
    parser.add_argument("--no-bertscore", action="store_true", help="skip BERTScore")
    parser.add_argument("--bertscore-model", help="BERTScore encoder: Hub name or local directory")
    parser.add_argument("--bertscore-layer", type=int, help="BERTScore layer (needed for a local model)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of the protocol's sampling")
    parser.add_argument("--output-dir", help="default: runs/eval/<checkpoint name>")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="any other arkd-eval override")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from arkd.recipes.evaluate import EvalError, compose, run

    args = parse_args(argv)
    output_dir = Path(args.output_dir or Path("runs") / "eval" / Path(args.checkpoint.rstrip("/")).name)
    try:
        cfg = compose(build_overrides(args))
        run(cfg, output_dir=output_dir)
    except EvalError as err:
        print(f"evaluate_checkpoint: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
