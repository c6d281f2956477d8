"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``checkpoints/step_XXXXXXX/`` holding

- ``model.safetensors``: the student's weights (tied duplicates stored once, their aliases in the metadata);
- ``state.pt``: optimizer, scheduler, alpha strategy (with its policy and the policy's optimizer), data position,
  step and counters, as a ``torch.save``'d dict of tensors and plain Python values, read back with
  ``torch.load(weights_only=True)`` so that loading never unpickles arbitrary objects;
- ``rng_rank{r}.pt``: the Python, NumPy and torch random states of every process (also plain tensors / values);
- ``COMPLETE``: written last; a directory without it is never resumed from.

Everything is first written to a hidden temporary directory beside the final one and then renamed with
``os.replace``, so a process killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{7,})$")
COMPLETE = "COMPLETE"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint taken after optimizer step ``step``."""
    return f"step_{step:07d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first (incomplete or temporary ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------------------------------------------------
# Model weights


def save_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict to safetensors, storing tensors that share memory (tied embeddings) once.

    Args:
        state: parameter name -> tensor (any device; copied to the CPU).
        path: the ``.safetensors`` file to write.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_weights`, restoring aliased names (they share one tensor)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    for alias, target in json.loads(metadata.get("aliases", "{}")).items():
        tensors[alias] = tensors[target]
    return tensors


# --------------------------------------------------------------------------------------------------------------------
# Random states


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states as plain tensors and values."""
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


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def write_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor] | None,
    state: dict[str, Any] | None,
    rng_states: list[dict[str, Any]],
    keep_last: int | None = None,
) -> Path:
    """Write a complete checkpoint atomically (call on the main process only).

    Args:
        root: the ``checkpoints/`` directory.
        step: optimizer steps done.
        model_state: the student's full state dict.
        state: everything else (plain tensors and Python values only).
        rng_states: one random-state dict per process, in rank order.
        keep_last: delete older checkpoints so that at most this many remain (None or 0: keep all).

    Returns:
        The final checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if model_state is not None:
        save_weights(model_state, tmp / MODEL_FILE)
    torch.save(state or {}, tmp / STATE_FILE)
    for rank, rng in enumerate(rng_states):
        torch.save(rng, tmp / f"rng_rank{rank}.pt")
    (tmp / COMPLETE).write_text(f"{step}\n")
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step (e.g. after a resume): replace it as a whole
        old = root / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last:
        for _, path in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load ``state.pt`` of a checkpoint without unpickling arbitrary objects."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def read_rng_state(path: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """The random states saved for process ``rank`` (None when the checkpoint had fewer processes)."""
    file = Path(path) / f"rng_rank{rank}.pt"
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
