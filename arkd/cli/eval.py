"""``arkd-eval``: generate with a model on the protocol's test sets and score Rouge-L, exact match and BERTScore.

    arkd-eval model_path=PATH_OR_HUB_NAME data_dir=../shared/data [datasets=[dolly,sni,unni]] [seeds=[10,20,30,40,50]]
              [max_rows=N] [batch_size=16] [decoding.greedy=true] [bertscore.enabled=false] [label=NAME]

The primary config is ``configs/evaluate.yaml``. This module only hands the composed config to
:func:`arkd.recipes.evaluate.run` and reports errors: bad input (a missing model or data file, an unknown dataset, a
BERTScore model that cannot be loaded) ends with one sentence on stderr and exit status 2.

Under ``torchrun --nproc_per_node N -m arkd.cli.eval ...`` (or ``accelerate launch``) the N processes share the rows
(docs/distributed.md); only rank 0 writes Hydra's files and the results, and prints.
"""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from arkd.config_paths import config_dir
from arkd.recipes.evaluate import EvalError, run

__all__ = ["main"]


def _task(cfg: DictConfig) -> None:
    from omegaconf.errors import MissingMandatoryValue

    try:
        run(cfg)
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or "model_path"
        print(f"arkd-eval: {key} is required; pass {key}=VALUE (e.g. model_path=PATH).", file=sys.stderr)
        sys.exit(2)
    except EvalError as err:  # every process raises the same one (arkd.recipes.evaluate.on_main): rank 0 says it
        if _rank() == 0:
            print(f"arkd-eval: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if _rank() == 0:
            print(
                "arkd-eval: interrupted; every generated row is kept in the output directory's generations.partial/ "
                "and the same command continues from them (results are written once every dataset is done).",
                file=sys.stderr,
            )
        sys.exit(130)


def _rank() -> int:
    value = os.environ.get("RANK", "")
    return int(value) if value.isdigit() else 0


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="evaluate", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def check_keys(argv: list[str]) -> str | None:
    """One sentence for an override of a key ``evaluate.yaml`` does not have (listing the valid ones), else None."""
    if any(a.startswith("-") for a in argv):
        return None
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    try:
        _compose(overrides)
    except Exception as err:  # noqa: BLE001 - only the missing-key case is answered here; Hydra reports the rest
        from arkd.cli._keys import unknown_key_sentence

        return unknown_key_sentence(err, overrides, _compose)
    return None


def main() -> None:
    """Console entry point (``arkd-eval``)."""
    import hydra

    problem = check_keys(sys.argv[1:])
    if problem is not None:
        if _rank() == 0:
            print(f"arkd-eval: {problem}", file=sys.stderr)
        sys.exit(2)
    if _rank() > 0:  # only rank 0 writes: no .hydra/ folder, no log file, no run directory of its own
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
        if not any(a.startswith("hydra.run.dir=") for a in sys.argv):
            sys.argv.append("hydra.run.dir=.")
    hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
