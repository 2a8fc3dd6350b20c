"""Errors that carry a message meant for the user: what is wrong and how to fix it.

The CLI prints these without a stack trace; anything else is a bug.
"""


class MetarunError(Exception):
    """Base class of user-facing errors."""


class ConfigError(MetarunError, ValueError):
    """A setting that cannot work (bad episode shape, bad override, ...)."""


class DataError(MetarunError, RuntimeError):
    """Missing, corrupt or unusable data files."""


class CheckpointError(MetarunError, RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt or from another config."""
