"""Compare alpha strategies over seeds: the same as the installed ``arkd-compare`` command (see arkd/cli/compare.py).

python scripts/compare_strategies.py multirun/tiny_matrix --out results/tiny_matrix
"""

import sys

from arkd.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
