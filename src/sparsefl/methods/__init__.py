"""Federated methods: each a :class:`Method` registered in ``METHODS`` with its config class."""

from sparsefl.methods import bn_only, dynamic, fedavg, fedskel, hidenseek, kd, static_mask, zerofl  # noqa: F401
from sparsefl.methods.base import HOOKS, LocalHooks, Method, Wrapper

__all__ = ["HOOKS", "LocalHooks", "Method", "Wrapper"]
