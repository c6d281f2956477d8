"""Run and output directories: writable before the work starts, never silently shared by two runs.

- :func:`check_writable` creates a directory and writes a probe file into it, so that a read-only or full file system
  is one sentence naming the path before any model is built (:class:`arkd.errors.OutputError`);
- :func:`prepare_run_dir` is what ``arkd-train`` does with its run directory before anything is built: refuse a
  directory that holds another run unless ``trainer.resume`` continues it or ``trainer.overwrite=true`` replaces
  it, pick the checkpoint to resume from (the newest that passes its checksums), refuse a resume whose config
  changed in a way that alters the run (:func:`config_differences`) unless ``trainer.resume_accept_changes=true``,
  and only then write ``config.yaml``;
- :func:`refuse_existing_outputs` is the same rule for ``arkd-eval`` and ``arkd-compare`` outputs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from arkd.errors import ConfigError, OutputError, describe_os_error

# What an arkd-train run leaves in its run directory (Hydra's .hydra/ and train.log do not count: Hydra writes them
# before the run starts).
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "best", "final", "report.json", "report.md", "summary.json")
RUN_FILES += ("alpha_trajectory.png",)

# Keys a resumed run may change without changing what it computes (paths, logging, how often it saves or
# validates, the final report after training).
RESUME_IGNORED = (
    "output_dir",
    "cache_dir",
    "label",
    "trainer.resume",
    "trainer.overwrite",
    "trainer.resume_accept_changes",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.log_interval",
    "trainer.save_interval",
    "trainer.eval_interval",
    "trainer.keep_last",
    "logger",
    "report",
)


# What `trainer.resume_accept_changes=true` may change on a resume: the keys that are proven to take effect on the
# resumed steps (tests/faults/test_train_faults.py::test_every_key_a_resume_accepts_takes_effect, key by key). The
# optimizer's hyper-parameters are put back from the config after the checkpoint's optimizer state is loaded
# (arkd.checkpoint.apply_hyperparameters); the trainer's keys are read from the config at every step. Any other
# change (the model, the data, the loss, the policy, the rollout, ...) would be overridden by the checkpoint's state
# or change what was trained mid-run: it is refused even with resume_accept_changes.
RESUME_ACCEPTED = (
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.betas",
    "optimizer.eps",
    "trainer.max_steps",
    "trainer.max_grad_norm",
    "trainer.kd_weight",
    "trainer.ce_weight",
    "trainer.on_nonfinite",
    "trainer.max_skipped",
    "trainer.max_skipped_fraction",
)


def check_writable(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` (with parents) and prove it writable with a probe file; raise :class:`OutputError`."""
    path = Path(path)
    probe = path / f".arkd-write-test-{os.getpid()}"
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"the {what} {path} is a file; expected a directory.")
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write to the {what} {path}: {describe_os_error(err)}.") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return path


def existing_run_files(run_dir: str | os.PathLike, names: Iterable[str] = RUN_FILES) -> list[str]:
    """The names of ``names`` present in ``run_dir``. A lone ``config.yaml`` (a run that failed during its set-up,
    before it logged, checkpointed or saved anything) is not a run: the corrected re-run may use the directory."""
    run_dir = Path(run_dir)
    found = [name for name in names if (run_dir / name).exists()]
    return [] if found == ["config.yaml"] and tuple(names) == RUN_FILES else found


# --------------------------------------------------------------------------------------------------------------------
# One job per run directory

LOCK_FILE = ".arkd.lock"
_HELD: dict[Path, int] = {}  # run directory -> the open lock file of this process
_RECORDED: set[int] = set()


def lock_run_dir(run_dir: str | os.PathLike, *, record: bool = True) -> None:
    """Take the run directory for this process (an exclusive ``flock`` on ``run_dir/.arkd.lock``, held until the
    process ends or :func:`release_run_dirs`); again in the same process is a no-op. Another job holding it raises
    :class:`ConfigError` naming it (its pid and start time), and nothing is written. ``record``: write this
    process's pid and start time into the lock file (not done by a check that may still refuse the command)."""
    import fcntl

    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        if record and _HELD[run_dir] not in _RECORDED:
            _record_holder(_HELD[run_dir])
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(f"cannot write to the run directory {run_dir}: {describe_os_error(err)}.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"the run directory {run_dir} is in use by another arkd-train job ({holder}); expected one job per run "
            "directory: wait for it to end, or use another directory."
        ) from None
    _HELD[run_dir] = fd
    if record:
        _record_holder(fd)


def _record_holder(fd: int) -> None:
    import socket
    import time

    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}".encode(), 0)
    _RECORDED.add(fd)


def release_run_dirs() -> None:
    """Release every run directory this process took (the lock file stays: removing it would race a new holder)."""
    import fcntl

    for run_dir, fd in list(_HELD.items()):
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            del _HELD[run_dir]
            _RECORDED.discard(fd)


def refuse_existing_outputs(out: str | os.PathLike, names: Iterable[str], *, overwrite: bool, key: str) -> None:
    """Raise :class:`ConfigError` when ``out`` already holds any of ``names`` and ``overwrite`` is off (``key``
    names the option that allows it)."""
    found = existing_run_files(out, names)
    if found and not overwrite:
        raise ConfigError(
            f"the output directory {out} already holds {', '.join(found)}; expected a new directory, or {key} to "
            "replace them."
        )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _ignored(key: str, ignored: Iterable[str]) -> bool:
    parts = key.split(".")
    for pattern in ignored:
        pattern_parts = pattern.split(".")
        if len(parts) >= len(pattern_parts) and all(p in ("*", q) for p, q in zip(pattern_parts, parts)):
            return True
    return False


def config_differences(saved: Mapping, current: Mapping, ignored: Iterable[str] = RESUME_IGNORED) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two resolved configs (``ignored`` prefixes skipped;
    ``*`` matches one key)."""
    old, new = _flatten(saved), _flatten(current)
    ignored = tuple(ignored)
    changes = []
    for key in sorted(set(old) | set(new)):
        if _ignored(key, ignored):
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            changes.append(f"{key}: {a!r} -> {b!r}")
    return changes


def prepare_run_dir(
    cfg: Any,
    run_dir: Path,
    *,
    is_main: bool,
    report: Callable[[str], Any] = print,
    barrier: Callable[[], Any] = lambda: None,
    dry_run: bool = False,
) -> Path | None:
    """Check and claim ``run_dir`` for this run before anything is built; return the checkpoint to resume from.

    Args:
        cfg: the composed config (``trainer.resume``, ``trainer.overwrite``, ``trainer.resume_accept_changes``).
        run_dir: the run directory (rank 0's).
        is_main: the main process writes (``config.yaml``, removals); every process decides the same.
        report: where one-line notices go (a corrupt checkpoint skipped, accepted config changes).
        barrier: waits for every process (between the look at the directory and the first write to it).
        dry_run: only check (arkd-train's command line, before Hydra writes ``.hydra/`` into the directory): take
            the directory's lock and refuse what the run would refuse, removing and writing nothing.

    Raises:
        ConfigError: the directory holds another run, or the resume's config differs (the differences listed).
        OutputError: the directory cannot be written.
    """
    from omegaconf import OmegaConf

    from arkd import checkpoint as ckpt

    trainer = cfg.trainer
    resume = trainer.get("resume")
    resume = None if resume in (None, False, "null", "none") else str(resume)
    overwrite = bool(trainer.get("overwrite", False))
    if is_main:
        check_writable(run_dir, "run directory")
        lock_run_dir(run_dir, record=not dry_run)  # one job at a time: checked and written by this one only
    found = existing_run_files(run_dir)
    barrier()  # every process has looked before the main one writes
    if found and resume is None:
        if not overwrite:
            raise ConfigError(
                f"the run directory {run_dir} already holds a run ({', '.join(found)}); expected a new directory, "
                "trainer.resume=auto to continue that run, or trainer.overwrite=true to replace it."
            )
        if is_main and not dry_run:
            for name in found:
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    resume_from = None
    # (a dry run does not hash the checkpoints: the run does, and falls back past a corrupt one)
    verify = ckpt.verify_checkpoint if not dry_run else lambda p: None if (p / ckpt.COMPLETE).is_file() else "no marker"
    if resume == "auto":
        resume_from = ckpt.latest_checkpoint(
            run_dir / "checkpoints", verify=not dry_run, on_corrupt=lambda message: report(f"arkd: {message}")
        )
    elif resume is not None:
        path = Path(resume)
        problem = verify(path) if path.is_dir() else "no such directory"
        if problem is not None:
            raise ConfigError(f"trainer.resume={resume}: {problem}; expected 'auto' or a complete, intact checkpoint.")
        resume_from = path

    current_text = OmegaConf.to_yaml(cfg, resolve=True)
    saved_text = ckpt.read_config_text(resume_from) if resume_from is not None else None
    if saved_text is None and resume is not None and (run_dir / "config.yaml").is_file():
        saved_text = (run_dir / "config.yaml").read_text()
    if saved_text is not None:
        import yaml

        changes = config_differences(yaml.safe_load(saved_text) or {}, yaml.safe_load(current_text) or {})
        if changes:
            where = resume_from if resume_from is not None else run_dir / "config.yaml"
            listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
            if not bool(trainer.get("resume_accept_changes", False)):
                raise ConfigError(
                    f"trainer.resume={resume}: this config differs from the one {where} was written with "
                    f"({len(changes)} change(s): {listed}); expected the same config, or "
                    "trainer.resume_accept_changes=true to continue with the new values."
                )
            refused = [c for c in changes if not _ignored(c.split(":", 1)[0], RESUME_ACCEPTED)]
            if refused:
                shown = "; ".join(refused[:8]) + (f"; and {len(refused) - 8} more" if len(refused) > 8 else "")
                raise ConfigError(
                    f"trainer.resume_accept_changes=true: {len(refused)} change(s) cannot take effect on a resume of "
                    f"{where} ({shown}); a resume may change only {', '.join(RESUME_ACCEPTED)}; expected the same "
                    "values, or a new run directory for a run with them."
                )
            report(f"arkd: resuming with {len(changes)} accepted config change(s): {listed}")
    if is_main and not dry_run:
        write_text_atomic(run_dir / "config.yaml", current_text)
    return resume_from


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (the old file survives a failure)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {describe_os_error(err)}.") from None
