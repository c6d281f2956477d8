"""``arkd-compare``: compare alpha strategies over seeds from the run directories of an ``arkd-train -m`` matrix.

    arkd-train -m config=tiny seed=0,1,2,3,4 \
        policy=fkl,rkl,constant,linear,cosine,akl,todi,entropy_gated,greedy,learned hydra.sweep.dir=multirun/tiny_matrix
    arkd-compare multirun/tiny_matrix --out results/tiny_matrix

Reads every run directory below RUN_ROOT (``config.yaml`` + ``report.json``, and any ``results.json`` of arkd-eval
below a run) and writes to --out: ``comparison.md`` (Rouge-L, BERTScore when present and exact match: mean ± std over
seeds per strategy and dataset; the paired difference of the reference strategy against each other one with a
Student-t interval), ``comparison.json`` (the tidy records and every number), ``heatmap.png`` (strategy x dataset),
``alpha_trajectory.png`` (the reference strategy's alpha over training, one line per seed) and
``alpha_strategies.png`` (alpha over training of every strategy, first seed). Bad input ends with one sentence on
stderr and exit status 2. See docs/results.md.
"""

from __future__ import annotations

import argparse
import sys

# What a comparison writes to --out; a folder holding any is refused without --overwrite.
OUTPUT_FILES = ("comparison.md", "comparison.json", "heatmap.png", "alpha_trajectory.png", "alpha_strategies.png")
DEFAULT_ORDER = ["fkl", "rkl", "constant", "linear", "cosine", "akl", "todi", "entropy_gated", "greedy", "learned"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="arkd-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", metavar="RUN_ROOT", help="a multirun sweep directory, or run directories")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--reference", default="learned", help="strategy the paired differences are taken against")
    parser.add_argument("--metrics", nargs="+", help="metrics to report (default: all present, Rouge-L first)")
    parser.add_argument("--confidence", type=float, default=0.95, help="level of the paired t intervals")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from arkd.evaluation.compare import compare, comparison_markdown

    args = parse_args(argv)
    if not 0.0 < args.confidence < 1.0:
        print(f"arkd-compare: --confidence {args.confidence}: expected a level between 0 and 1.", file=sys.stderr)
        return 2
    from arkd.errors import ConfigError, OutputError
    from arkd.run_dir import check_writable, refuse_existing_outputs

    try:  # before any work: --out holds no earlier comparison (unless --overwrite) and is writable
        refuse_existing_outputs(args.out, OUTPUT_FILES, overwrite=args.overwrite, key="--overwrite")
        check_writable(args.out, "output directory")
    except (ConfigError, OutputError) as err:
        print(f"arkd-compare: {err}", file=sys.stderr)
        return 2
    try:
        result = compare(
            args.roots,
            args.out,
            reference=args.reference,
            metrics=args.metrics,
            confidence=args.confidence,
            order=DEFAULT_ORDER,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"arkd-compare: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from arkd.errors import describe_os_error

        print(f"arkd-compare: cannot write to {args.out}: {describe_os_error(err)}.", file=sys.stderr)
        return 1
    print(comparison_markdown(result))
    if result["incomplete"]:
        left_out = len(result["incomplete"])
        print(f"[arkd-compare] {left_out} run(s) without report.json were left out", file=sys.stderr)
    figures = len(result["figures"])
    print(f"[arkd-compare] wrote comparison.md, comparison.json and {figures} figure(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
