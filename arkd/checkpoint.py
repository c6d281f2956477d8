"""Atomic, pickle-free training checkpoints.

A checkpoint is a directory ``checkpoints/step_XXXXXXX/`` holding

- ``model.safetensors``: the student's weights (tied duplicates stored once, their aliases in the metadata);
- ``state.pt``: optimizer, scheduler, alpha strategy (with its policy and the policy's optimizer), data position,
  step and counters, as a ``torch.save``'d dict of tensors and plain Python values, read back with
  ``torch.load(weights_only=True)`` so that loading never unpickles arbitrary objects;
- ``rng_rank{r}.pt``: the Python, NumPy and torch random states of every process (also plain tensors / values);
- ``config.yaml``: the run's resolved config when the run directory has one (compared on resume);
- ``manifest.json``: the size and SHA-256 of every other file, and ``healthy`` (the trainer's verdict: finite weights
  and a run not failing when it was written);
- ``COMPLETE``: written last; a directory without it is never resumed from.

Everything is first written to a hidden temporary directory beside the final one and then renamed with
``os.replace``, so a process killed while saving leaves the previous checkpoint intact; :func:`clean_stale` removes
the temporary directories such a kill leaves behind (and puts back a checkpoint caught between its two renames).
:func:`verify_checkpoint` checks the manifest before a checkpoint is loaded, and :func:`latest_checkpoint` with
``verify=True`` skips corrupt checkpoints, reporting each in one sentence, so a resume falls back to the newest good
one. Rotation (``keep_last``) never deletes the newest healthy checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from arkd import rng
from arkd.errors import OutputError, describe_os_error

STEP_DIR = re.compile(r"^step_(\d{7,})$")
COMPLETE = "COMPLETE"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
_STALE = re.compile(r"^\.(tmp|old)_(step_\d{7,})_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, corrupt, unreadable); the message is one sentence."""


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


def latest_checkpoint(
    root: str | os.PathLike, *, verify: bool = False, on_corrupt: Callable[[str], Any] | None = None
) -> Path | None:
    """The newest complete checkpoint under ``root``, or None.

    Args:
        root: the ``checkpoints/`` directory.
        verify: check each candidate's manifest (sizes and SHA-256), newest first, and return the newest that passes.
        on_corrupt: called with one sentence for every checkpoint skipped as corrupt (e.g. ``print``).
    """
    found = list_checkpoints(root)
    if not verify:
        return found[-1][1] if found else None
    corrupt: list[tuple[Path, str]] = []
    good = None
    for _, path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            good = path
            break
        corrupt.append((path, problem))
    if on_corrupt is not None:
        for path, problem in corrupt:
            fallback = f"using the previous good one, {good.name}" if good else "no older good checkpoint is left"
            on_corrupt(f"checkpoint {path} is corrupt ({problem}); {fallback}.")
    return good


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's ``manifest.json`` (None when it has none: checkpoints written before manifests existed)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint, in a few words, or None when it is complete and every file matches its
    manifest (size and SHA-256). A checkpoint without a manifest (older arkd) is only checked for completeness."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return f"no {COMPLETE} marker"
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable: {type(err).__name__}"
    if manifest is None:
        return None if (path / STATE_FILE).is_file() else f"{STATE_FILE} is missing"
    return _files_problem(path, manifest)


def _files_problem(directory: Path, manifest: dict[str, Any]) -> str | None:
    """The first file of ``manifest`` that is missing, of another size or fails its SHA-256, in a few words."""
    for name, entry in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, expected {entry['size']}"
        if file_digest(file) != entry["sha256"]:
            return f"{name} fails its SHA-256 checksum"
    return None


def write_manifest(directory: str | os.PathLike, **extra: Any) -> dict[str, Any]:
    """Write ``manifest.json`` into ``directory``: the size and SHA-256 of every file in it (sub-directories
    skipped), and ``extra``; the files are flushed to disk first. The caches arkd writes use it (the SFT cache),
    read back by :func:`verify_manifest`."""
    directory = Path(directory)
    files = {
        f.name: {"size": f.stat().st_size, "sha256": file_digest(f)}
        for f in sorted(directory.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    manifest = {**extra, "files": files}
    _fsync_files(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync_dir(directory)
    return manifest


def verify_manifest(directory: str | os.PathLike) -> str | None:
    """What is wrong with a directory written with :func:`write_manifest`, in a few words (``manifest.json is
    missing``, ``NAME has A bytes, expected B``, ``NAME fails its SHA-256 checksum``), or None when it is intact."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError) as err:
        return f"{MANIFEST} unreadable: {type(err).__name__}"
    if manifest is None:
        return f"{MANIFEST} is missing"
    return _files_problem(directory, manifest)


def is_healthy(path: str | os.PathLike) -> bool:
    """Whether the trainer marked the checkpoint healthy (True for checkpoints without a manifest)."""
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        return False
    return True if manifest is None else bool(manifest.get("healthy", True))


def clean_stale(root: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories an interrupted :func:`write_checkpoint` left in ``root``; returns them.

    A checkpoint caught between its two renames (``step_X`` moved aside to ``.old_step_X_PID``, the new one not yet
    in place) is put back rather than deleted. Call on the main process before training starts.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for child in sorted(root.iterdir()):
        match = _STALE.match(child.name)
        if not match or not child.is_dir():
            continue
        final = root / match.group(2)
        if match.group(1) == "old" and not final.exists() and (child / COMPLETE).is_file():
            os.replace(child, final)
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    return removed


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
# Model health: what "healthy" means wherever a model is saved, kept, published or evaluated

PROBE_LENGTH = 8


def weights_problem(model: torch.nn.Module) -> str | None:
    """``K weight tensor(s) hold NaN or inf (first: NAME)``, or None when every parameter is finite."""
    bad = [name for name, p in model.named_parameters() if p.numel() and not bool(torch.isfinite(p.detach()).all())]
    return f"{len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]})" if bad else None


def probe_input(model: torch.nn.Module, length: int = PROBE_LENGTH) -> torch.Tensor:
    """A fixed probe input ``[1, L]`` for a causal LM: token ids ``0, 1, ..., L-1`` (modulo the vocabulary), ``L``
    at most the model's positions."""
    config = getattr(model, "config", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(config, "vocab_size", None) or 2
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or length
    return torch.arange(min(length, int(positions))).remainder(int(vocab)).unsqueeze(0)


@torch.no_grad()
def outputs_problem(model: torch.nn.Module, length: int = PROBE_LENGTH) -> str | None:
    """``its outputs on a probe input hold NaN or inf (N of M logits)``, or None when the logits of one forward on
    :func:`probe_input` are finite. Finite weights are not enough: weights of 1e30 are finite and every output of
    such a model is NaN. The model is run in eval mode (no dropout, no random draw) and put back in its mode."""
    params = next(iter(model.parameters()), None)
    if params is None:
        return None
    ids = probe_input(model, length).to(params.device)
    training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(training)
    logits = out.logits if hasattr(out, "logits") else out[0]
    bad = int((~torch.isfinite(logits.float())).sum())
    return f"its outputs on a probe input hold NaN or inf ({bad} of {logits.numel()} logits)" if bad else None


def model_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """A short hash of a model's identity: every parameter's name, shape and dtype and the exact bytes of an evenly
    spaced sample of its values (cheap for any size, the same on every device). Two processes that loaded different
    models (or one of them another checkpoint) differ."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)].to("cpu").contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes() if picked.numel() else b"")
    return digest.hexdigest()[:16]


def model_problem(model: torch.nn.Module) -> str | None:
    """What makes ``model`` unfit to be saved, kept, published or evaluated (non-finite weights, or non-finite
    outputs on a probe input), in a few words; None for a healthy model."""
    return weights_problem(model) or outputs_problem(model)


# --------------------------------------------------------------------------------------------------------------------
# Random states


capture_rng_state = rng.capture  # the whole random state of a process (one per process in a checkpoint)
restore_rng_state = rng.restore


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
    healthy: bool = True,
    config_text: str | None = None,
) -> Path:
    """Write a complete checkpoint atomically (call on the main process only).

    Args:
        root: the ``checkpoints/`` directory.
        step: optimizer steps done.
        model_state: the student's full state dict.
        state: everything else (plain tensors and Python values only).
        rng_states: one random-state dict per process, in rank order.
        keep_last: delete older checkpoints so that at most this many remain (None or 0: keep all); the newest
            healthy checkpoint is kept even when it is older.
        healthy: the caller's verdict on this checkpoint (finite weights, run not failing), stored in the manifest.
        config_text: the run's resolved config (YAML), stored as ``config.yaml``.

    Returns:
        The final checkpoint directory.
    """
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if model_state is not None:
            save_weights(model_state, tmp / MODEL_FILE)
        torch.save(state or {}, tmp / STATE_FILE)
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng_rank{rank}.pt")
        if config_text is not None:
            (tmp / CONFIG_FILE).write_text(config_text)
        files = {
            f.name: {"size": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(tmp.iterdir()) if f.is_file()
        }
        (tmp / MANIFEST).write_text(
            json.dumps({"step": step, "healthy": bool(healthy), "files": files}, indent=1) + "\n"
        )
        _fsync_files(tmp)
        (tmp / COMPLETE).write_text(f"{step}\n")
        _fsync_dir(tmp)
    except (OSError, RuntimeError) as err:  # a full or read-only disk: drop the partial copy, keep the others
        shutil.rmtree(tmp, ignore_errors=True)
        reason = describe_os_error(err) if isinstance(err, OSError) else " ".join(str(err).split())[:200]
        raise OutputError(
            f"cannot write the checkpoint {final}: {reason}; the earlier checkpoints are untouched."
        ) from None
    swap_in(tmp, final, root / f".old_{final.name}_{os.getpid()}")  # a re-run of a step is replaced as a whole
    _fsync_dir(root)
    if keep_last:
        rotate(root, keep_last)
    return final


def load_verified(path: Path, load: Callable[[Path], None]) -> None:
    """``load(path)`` once ``path`` passes its manifest; a checkpoint that fails it or cannot be read raises
    :class:`CheckpointError` (one sentence)."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(
            f"cannot resume from {path}: {problem}; expected a complete checkpoint written by arkd-train "
            "(trainer.resume=auto falls back to the newest good one)."
        )
    try:
        load(path)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"cannot resume from {path}: {type(err).__name__}: {first[:300]}; expected a checkpoint of this run's "
            "model, optimizer and strategy."
        ) from err


def weights_finite(model: torch.nn.Module, accelerator: Any) -> bool:
    """Whether ``model`` is healthy (:func:`model_problem`: finite weights, finite outputs on a probe input) on every
    process (a collective under several)."""
    bad = model_problem(model) is not None
    flag = torch.tensor(float(bad), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return flag.item() == 0


def swap_in(tmp: Path, final: Path, old: Path) -> None:
    """Put the finished directory ``tmp`` at ``final``: an existing ``final`` is moved aside to ``old`` first and
    removed once the new one is in place (a process killed between the two renames leaves ``old``, which
    :func:`clean_stale_outputs` puts back)."""
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def publish_model(save: Callable[[Path], None], final: Path) -> None:
    """Write a model directory atomically: ``save(tmp)`` into ``.tmp_NAME`` beside ``final``, then
    :func:`swap_in`. A full or read-only disk raises :class:`OutputError` (one sentence) and leaves the previous
    ``final`` untouched."""
    tmp, old = final.parent / f".tmp_{final.name}", final.parent / f".old_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = describe_os_error(err) if isinstance(err, OSError) else " ".join(str(err).split())[:200]
        raise OutputError(f"cannot write {final}: {reason}; the previous {final.name}/ is untouched.") from None
    swap_in(tmp, final, old)


def clean_stale_outputs(run_dir: Path, names: tuple[str, ...] = ("best", "final")) -> None:
    """Remove what an interrupted :func:`publish_model` left in ``run_dir``; a model moved aside and not yet
    replaced is put back."""
    for name in names:
        shutil.rmtree(run_dir / f".tmp_{name}", ignore_errors=True)
        old = run_dir / f".old_{name}"
        if old.is_dir() and not (run_dir / name).exists():  # killed between the two renames
            old.rename(run_dir / name)
        shutil.rmtree(old, ignore_errors=True)


def rotate(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, never the newest healthy one; returns the
    deleted directories."""
    found = list_checkpoints(root)
    kept = found[-keep_last:]
    if not any(is_healthy(path) for _, path in kept):
        good = next((entry for entry in reversed(found[:-keep_last]) if is_healthy(entry[1])), None)
        if good is not None:
            kept.append(good)
    deleted = []
    for entry in found:
        if entry not in kept:
            shutil.rmtree(entry[1], ignore_errors=True)
            deleted.append(entry[1])
    return deleted


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of every parameter group (everything but ``params``), as the config built them: taken
    before a checkpoint's optimizer state is loaded, put back by :func:`apply_hyperparameters`."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, fresh: list[dict[str, Any]]) -> None:
    """After a resume loaded the checkpoint's optimizer (and scheduler) state: put back the config's hyper-parameters
    (``weight_decay``, ``betas``, ``eps``, ... and the base learning rate), which ``load_state_dict`` replaced by the
    checkpoint's, so that a change accepted on resume takes effect. The learning rate of the next step is recomputed
    by the schedule from the config's base rate at the checkpoint's step: identical to the checkpoint's when nothing
    changed (a resume stays bit-exact)."""
    if len(fresh) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(optimizer.param_groups)} parameter groups, the config {len(fresh)}")
    for group, values in zip(optimizer.param_groups, fresh):
        for key, value in values.items():
            if key != "lr":
                group[key] = value
    if scheduler is None:
        for group, values in zip(optimizer.param_groups, fresh):
            group["lr"] = values["lr"]
        return
    bases = [values.get("initial_lr", values["lr"]) for values in fresh]
    if list(scheduler.base_lrs) == bases:
        return  # unchanged: keep the checkpoint's learning rate as it is
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        raise ValueError(f"a changed learning rate cannot be applied to a {type(scheduler).__name__} on resume")
    scheduler.base_lrs = bases
    rates = [base * fn(scheduler.last_epoch) for base, fn in zip(bases, lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def read_config_text(path: str | os.PathLike) -> str | None:
    """The run config stored with a checkpoint (None for checkpoints written without one)."""
    file = Path(path) / CONFIG_FILE
    return file.read_text() if file.is_file() else None


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load ``state.pt`` of a checkpoint without unpickling arbitrary objects."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def read_rng_state(path: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """The random states saved for process ``rank`` (None when the checkpoint had fewer processes)."""
    file = Path(path) / f"rng_rank{rank}.pt"
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


def _fsync_files(directory: Path) -> None:
    """Flush every file of ``directory`` to disk (so that COMPLETE never lands before the data it vouches for)."""
    for file in directory.iterdir():
        if file.is_file():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())


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
