"""Errors that carry a message meant for the user: what is wrong and how to fix it.

The CLI prints these without a stack trace; anything else is a bug. Every layer (data,
algorithms, runners) imports its errors from here, and this module imports nothing.
"""


class MetarunError(Exception):
    """Base class of user-facing errors."""


class ConfigError(MetarunError, ValueError):
    """A setting that cannot work (bad episode shape, bad override, ...)."""


class DataError(MetarunError, RuntimeError):
    """Missing, corrupt or unusable data files."""


class CheckpointError(MetarunError, RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt or from another config."""


class StoppedError(MetarunError, RuntimeError):
    """Training stopped on purpose with its state saved: a signal, or a non-finite loss.

    `exit_code` is the process status the CLI ends with (128 + signal number for a
    signal, as shells report it)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def summarise(items, limit: int = 5) -> str:
    """'a, b, c', or 'a, b, c, d, e and 7 more': a list of names short enough for a message."""
    items = [str(x) for x in items]
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"
