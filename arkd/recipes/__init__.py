"""The recipes: what each command does, as a function of its composed config.

A recipe is ``run(cfg) -> dict``: it builds every object the command needs from the Hydra config, does the work and
writes the run directory; the command-line modules (:mod:`arkd.cli`) only parse, report errors and call it.

- :mod:`arkd.recipes.distill`: ``arkd-train`` (SFT'd teacher and student from :mod:`arkd.recipes.sft_cache`,
  distillation with :class:`arkd.trainer.Trainer`, the final report);
- :mod:`arkd.recipes.evaluate`: ``arkd-eval`` (the protocol's generation and scores on the test sets);
- :mod:`arkd.recipes.build`: the building blocks of training runs (accelerator, models from their config, the data
  stream, the learning-rate schedule).

The submodules are imported on use (``from arkd.recipes.distill import run``): ``import arkd.recipes`` imports
nothing heavy.
"""
