"""Errors that arkd's commands report as one sentence (no stack trace)."""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, what it got and what was expected."""


class OutputError(OSError):
    """An output path that cannot be written (read-only or full file system, not a directory); the message names
    the path and says what was kept."""


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
