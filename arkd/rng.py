"""Random state in one place: the whole state of a process (for checkpoints and RNG-neutral validation) and the
torch streams a block can run under (a replayed snapshot: the same dropout masks again; or a fixed seed), always
restoring what was there before.

- :func:`capture` / :func:`restore`: Python's, NumPy's, torch's CPU and every CUDA generator (a checkpoint holds one
  per process; validation runs between the two so that training continues on the same streams);
- :func:`snapshot` / :class:`replaying`: torch's CPU generator and the device's, the cheap pair a forward's dropout
  draws from (the legacy same-batch reward replays the training forward's masks);
- :class:`seeded`: a block under ``torch.manual_seed(seed)`` (generation streams derived from (seed, rank, index)).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture", "replaying", "restore", "seeded", "snapshot"]


def capture() -> dict[str, Any]:
    """The whole random state of this process (Python, NumPy, torch CPU, every CUDA device)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's CPU state and ``device``'s (None off CUDA): what a forward's dropout masks are drawn from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _forked:
    """A block on forked torch generators (CPU and ``device``), restored on exit; subclasses set the state."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._fork: Any = None

    def __enter__(self) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        self.set_state()

    def set_state(self) -> None:
        raise NotImplementedError

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)


class replaying(_forked):
    """Run a block with the random state of a :func:`snapshot` (the same dropout masks), restoring the state after."""

    def __init__(self, state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
        super().__init__(device)
        self.state = state

    def set_state(self) -> None:
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)


class seeded(_forked):
    """Run a block under ``torch.manual_seed(seed)`` and restore every random state after (CPU and the device)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        super().__init__(device)
        self.seed = seed

    def set_state(self) -> None:
        torch.manual_seed(self.seed)
