"""The exception types sparsefl raises on purpose.

Every error a user can cause (a bad configuration key, a missing dataset, a corrupted payload)
is one of these, with a message that names the field, the value and what is allowed. The CLI
turns them into one line and exit code 2; anything else is a bug.
"""

from __future__ import annotations

from typing import Any


class SparseflError(Exception):
    """Base class of every error sparsefl raises deliberately."""


class ConfigError(SparseflError, ValueError):
    """A configuration key is unknown, of the wrong type, or out of range.

    Parameters
    ----------
    key:
        Dotted name of the key (``"data.alpha"``).
    value:
        The offending value (``None`` when the key itself is the problem).
    allowed:
        What would have been accepted, in words (``"a number > 0"``, ``"one of: iid, dirichlet"``).
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"config key '{key}': got {value!r}; allowed: {allowed}")


class DataError(SparseflError):
    """A dataset is missing, malformed, or cannot be partitioned as asked."""


class DecodeError(SparseflError, ValueError):
    """An encoded payload failed strict validation; nothing of it was applied."""


class RunFolderError(SparseflError):
    """A run folder cannot be used: another configuration owns it, or it is damaged."""
