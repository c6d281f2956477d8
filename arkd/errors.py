"""Errors that arkd's commands report as one sentence (no stack trace)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, what it got and what was expected."""


class OutputError(OSError):
    """An output path that cannot be written (read-only, full disk, not a directory, another run's outputs); the
    message names the path."""
