"""Dense FedAvg: the base :class:`~sparsefl.methods.base.Method` registered under ``fedavg``."""

from __future__ import annotations

from dataclasses import dataclass

from sparsefl.config import MethodConfig
from sparsefl.errors import ConfigError
from sparsefl.methods.base import Method
from sparsefl.registry import METHODS


@dataclass(frozen=True)
class FedAvgConfig(MethodConfig):
    """FedAvg is dense: ``method.sparsity`` must stay 0 (use a sparse method to prune)."""

    def __post_init__(self) -> None:
        if self.sparsity != 0:
            raise ConfigError("method.sparsity", self.sparsity, "0 for fedavg (a dense method)")


@METHODS.register("fedavg", FedAvgConfig, summary="Dense FedAvg (McMahan et al. 2017): full models both ways")
class FedAvg(Method):
    """Dense FedAvg: full model down, full model up, sample-weighted mean."""

    config_cls = FedAvgConfig
