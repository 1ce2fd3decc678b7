"""Temporary replacement of module instances' ``forward``, so the user's model is left as it was.

Methods and kernels that change how a layer computes during local training (SWAT's sparse
products, the compact skeleton backward, CSR Linear layers) replace the ``forward`` of that
layer *instance* only, and put it back when training ends; the user's classes, every other
instance and the parameters' names are never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class ForwardPatches:
    """A stack of replaced instance ``forward`` attributes, restored in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, bool, Any]] = []

    def replace(self, mod: nn.Module, forward: Callable[..., Any]) -> None:
        """Make ``mod(x)`` call ``forward(x)`` until :meth:`restore`."""
        self._saved.append((mod, "forward" in mod.__dict__, mod.__dict__.get("forward")))
        mod.forward = forward  # type: ignore[method-assign]

    def restore(self) -> None:
        """Put every replaced ``forward`` back (an instance attribute that did not exist is removed)."""
        for mod, had, fwd in reversed(self._saved):
            if had:
                mod.forward = fwd  # type: ignore[method-assign]
            else:
                mod.__dict__.pop("forward", None)
        self._saved.clear()

    def __len__(self) -> int:
        return len(self._saved)
