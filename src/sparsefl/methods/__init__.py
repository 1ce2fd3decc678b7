"""Federated methods: each a :class:`Method` registered in ``METHODS`` with its config class."""

import sparsefl.methods.dynamic  # noqa: F401  (fills the registry)
import sparsefl.methods.hidenseek  # noqa: F401  (fills the registry)
import sparsefl.methods.kd  # noqa: F401  (fills the registry)
import sparsefl.methods.static_mask  # noqa: F401  (fills the registry)
from sparsefl.methods import bn_only, fedavg, fedskel, zerofl  # noqa: F401  (fill the registry)
from sparsefl.methods.base import LocalContext, LocalHooks, Method, ModelSpec, Received, ServerState

__all__ = ["LocalContext", "LocalHooks", "Method", "ModelSpec", "Received", "ServerState"]
