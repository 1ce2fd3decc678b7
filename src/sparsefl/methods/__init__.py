"""Federated methods: each a :class:`Method` registered in ``METHODS`` with its config class."""

from sparsefl.methods import fedavg  # noqa: F401  (fills the registry)
from sparsefl.methods.base import LocalContext, LocalHooks, Method, ModelSpec, Received, ServerState

__all__ = ["LocalContext", "LocalHooks", "Method", "ModelSpec", "Received", "ServerState"]
