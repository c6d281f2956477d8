"""``arkd-eval``: generate with a model on the protocol's test sets and score Rouge-L, exact match and BERTScore.

    arkd-eval model_path=PATH_OR_HUB_NAME data_dir=../shared/data [datasets=[dolly,sni,unni]] [seeds=[10,20,30,40,50]]
              [max_rows=N] [batch_size=16] [decoding.greedy=true] [bertscore.enabled=false] [label=NAME]

The primary config is ``configs/evaluate.yaml``. This module only hands the composed config to
:func:`arkd.recipes.evaluate.run` and reports errors: bad input (a missing model or data file, an unknown dataset, a
BERTScore model that cannot be loaded) ends with one sentence on stderr and exit status 2.
"""

from __future__ import annotations

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
    except EvalError as err:
        print(f"arkd-eval: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "arkd-eval: interrupted; nothing was written (results are written once every dataset is done).",
            file=sys.stderr,
        )
        sys.exit(130)


def main() -> None:
    """Console entry point (``arkd-eval``)."""
    import hydra

    hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
