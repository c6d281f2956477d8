"""A launcher's worker that is given other arguments on one rank: ``python _rank_args.py MODULE ARGS...`` runs
``python -m MODULE ARGS...``, with ``$ARKD_TEST_RANK1_ARGS`` (space-separated) appended on rank 1 only. It stands for
any launch whose processes were not started with one command (a hand-written per-rank script, a mixed-up job file)."""

import os
import runpy
import sys

module, args = sys.argv[1], sys.argv[2:]
if os.environ.get("RANK") == "1":
    args += os.environ.get("ARKD_TEST_RANK1_ARGS", "").split()
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
