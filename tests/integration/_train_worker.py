"""Run ``arkd-train`` (the real entry point) in each process of a ``torchrun`` launch and, after training, dump
this rank's student weights and policy state to ``$ARKD_TEST_DUMP/rank{r}.pt`` so a test can compare the ranks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from arkd.cli.train import main
from arkd.trainer import Trainer

_fit = Trainer.fit


def _fit_and_dump(self, *args, **kwargs):
    state = _fit(self, *args, **kwargs)
    if self.strategy is not None:  # the distillation stage (the SFT stages have no strategy)
        student = self.accelerator.unwrap_model(self.student)
        dump = {
            "student": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "policy": {k: v.detach().clone() for k, v in self.strategy.network.state_dict().items()},
            "steps": state.step,
        }
        torch.save(dump, Path(os.environ["ARKD_TEST_DUMP"]) / f"rank{self.accelerator.process_index}.pt")
    return state


Trainer.fit = _fit_and_dump

if __name__ == "__main__":
    main(sys.argv[1:])
