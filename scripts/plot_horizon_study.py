"""The short-horizon finding as a figure: the effect of alpha on held-out D after H steps, and how often its sign
after H steps agrees with its sign at the end of the run, on `config=tiny_tradeoff`.

The numbers are the branching study's (../shared/reviews/horizon-study.md: 5 seeds x 5 states, alpha 0.9 vs 0.1 for
H steps from one snapshot, then alpha 0.5 to the end; delta = D(lo) - D(hi), positive = the FKL-leaning branch
better), copied here with their source; the figure adds nothing to them.

    python scripts/plot_horizon_study.py --out docs/results/horizon_study/effect_vs_horizon.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

# H, mean delta after H (validation), t, share FKL-better after H, share sign after H == sign at the end
POOLED = [
    (1, -0.0007, -1.46, 0.36, 0.36),
    (8, -0.0056, -2.03, 0.40, 0.48),
    (32, 0.0117, 2.45, 0.80, 0.68),
    (120, 0.0526, 4.94, 0.88, 0.88),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = [row[0] for row in POOLED]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.6, 3.6))
    ax.axhline(0, color="0.4", lw=0.8)
    ax.plot(h, [row[2] for row in POOLED], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("horizon H (optimiser steps)")
    ax.set_ylabel("t of D(alpha 0.1) - D(alpha 0.9) after H")
    ax.set_title("effect of alpha after H steps (> 0: FKL better)", fontsize=9)
    ax.grid(alpha=0.3)
    bx.axhline(0.5, color="0.4", lw=0.8, ls=":")
    bx.plot(h, [row[4] for row in POOLED], "s-", color="C3")
    bx.set_xscale("log")
    bx.set_ylim(0, 1)
    bx.set_xlabel("horizon H (optimiser steps)")
    bx.set_ylabel("share: sign after H = sign at end")
    bx.set_title("does the H-step answer predict the end of the run?", fontsize=9)
    bx.grid(alpha=0.3)
    fig.suptitle("tiny_tradeoff, 5 seeds x 5 states (shared/reviews/horizon-study.md)", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
