"""Errors that arkd's commands report as one sentence (no stack trace)."""

from __future__ import annotations

import errno
from pathlib import Path


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, what it got and what was expected."""


class OutputError(OSError):
    """An output path that cannot be written (read-only or full file system, not a directory); the message names
    the path and says what was kept."""


class NonFiniteLossError(RuntimeError):
    """Raised with ``on_nonfinite="stop"`` when a step's loss or gradient is NaN or infinite."""


class RunFailedError(RuntimeError):
    """The run reached ``max_steps`` but failed: its weights are not finite, or more than
    ``max_skipped_fraction`` of its steps were skipped. No ``final/`` was written; the message is one sentence."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived: the step in progress was finished and a checkpoint written.

    Attributes:
        signum: the signal's number (the CLI exits with ``128 + signum``).
        checkpoint: the checkpoint written, or None.
    """

    def __init__(self, message: str, signum: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


def describe_os_error(err: OSError) -> str:
    """A few words for a file-system error (read-only, full, permission), without the errno noise."""
    names = {
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a part of the path is a file",
    }
    return names.get(err.errno, err.strerror or type(err).__name__)
