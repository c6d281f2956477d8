"""Prepare the protocol's Dolly splits, or the offline synthetic task splits, as JSONL files.

Dolly (needs the Hugging Face Hub, or a local copy of the raw dataset as JSONL):

    python scripts/prepare_data.py dolly --out data/dolly --tokenizer gpt2 --seed 1234

writes ``train.jsonl`` (about 12.5k rows), ``valid.jsonl`` (1000) and ``test.jsonl`` (500) after dropping the rows
whose prompt is over 256 GPT-2 tokens (the count is printed). Synthetic tasks (offline):

    python scripts/prepare_data.py synthetic --out data/synthetic --n-train 20000 --n-validation 200 --n-test 500

``--test-by-family`` also writes the test split one file per task family (``test_by_family/<family>.jsonl``), so that
``arkd-eval datasets=[...]`` scores each family as a dataset (the per-family heatmap of docs/results.md). With the
tiny job's split sizes (``--n-train 4000 --n-validation 64 --n-test 200``) these are exactly its 200 test rows.

See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arkd.data import load_examples, prepare_dolly, write_jsonl, write_synthetic_splits
from arkd.data.synthetic import FAMILIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dolly = sub.add_parser("dolly", help="the protocol's Dolly train / validation / test split")
    dolly.add_argument("--source", default="databricks/databricks-dolly-15k", help="Hub name or raw-schema JSONL")
    dolly.add_argument("--tokenizer", default="gpt2", help="tokenizer that measures prompts (Hub name or path)")
    dolly.add_argument("--out", required=True, help="output directory")
    dolly.add_argument("--seed", type=int, default=1234)
    dolly.add_argument("--n-validation", type=int, default=1000)
    dolly.add_argument("--n-test", type=int, default=500)
    dolly.add_argument("--max-prompt-length", type=int, default=256)
    synthetic = sub.add_parser("synthetic", help="offline synthetic task splits")
    synthetic.add_argument("--out", required=True, help="output directory")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--n-train", type=int, default=20000)
    synthetic.add_argument("--n-validation", type=int, default=200)
    synthetic.add_argument("--n-test", type=int, default=500)
    synthetic.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=None)
    synthetic.add_argument(
        "--test-by-family", action="store_true", help="also write the test split per family: test_by_family/*.jsonl"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the preparation; returns the process exit status (errors print one sentence and return 1)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "dolly":
            from arkd.models import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
            report = prepare_dolly(
                args.source,
                tokenizer,
                args.out,
                seed=args.seed,
                n_validation=args.n_validation,
                n_test=args.n_test,
                max_prompt_length=args.max_prompt_length,
            )
            print(report.summary())
            for name, path in report.files.items():
                print(f"{name}: {path}")
        else:
            paths = write_synthetic_splits(
                args.out,
                n_train=args.n_train,
                n_validation=args.n_validation,
                n_test=args.n_test,
                seed=args.seed,
                families=args.families,
            )
            if args.test_by_family:
                by_family: dict[str, list] = {}
                for example in load_examples(paths["test"]):
                    by_family.setdefault(example.topic, []).append(example)
                for family, rows in sorted(by_family.items()):
                    paths[f"test/{family}"] = write_jsonl(rows, Path(args.out) / "test_by_family" / f"{family}.jsonl")
            for name, path in paths.items():
                print(f"{name}: {path}")
    except (OSError, ValueError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
