"""Federated methods: each a :class:`Method` registered in ``METHODS`` with its config class."""

from sparsefl.methods import (  # noqa: F401
    bn_only,
    dynamic,
    fedavg,
    feddst,
    fedmask,
    fedpm,
    fedrts,
    fedskel,
    fedtiny,
    hidenseek,
    kd,
    prunefl,
    static_mask,
    zerofl,
)
from sparsefl.methods.base import HOOKS, LocalHooks, Method, Wrapper

__all__ = ["HOOKS", "LocalHooks", "Method", "Wrapper"]
