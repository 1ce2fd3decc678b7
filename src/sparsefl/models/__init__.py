"""Models without torchvision: mlp, cnn (LeNet-style), CIFAR-style resnet8/20/32, resnet18/34/50
(3x3 stem; resnet18_imagenet with the ImageNet stem), vgg11/vgg16 with BatchNorm. Input shape
and class count come from the data.

Every builder has the signature ``(input_shape, num_classes, width) -> nn.Module``; the Python
API accepts any user ``nn.Module`` in their place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from sparsefl.config import ModelConfig
from sparsefl.models import nets  # noqa: F401  (fills the registry)
from sparsefl.registry import MODELS
from sparsefl.rng import seeded_torch


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build ``cfg.name`` with weights initialised from ``seed`` (global RNG left untouched)."""
    builder = MODELS.get(cfg.name)
    with seeded_torch(seed, "model-init"):
        return builder(tuple(input_shape), num_classes, cfg.width)


@dataclass(frozen=True)
class ModelSpec:
    """How to build a fresh copy of the model anywhere: a template module that is deep-copied.

    Any user ``nn.Module`` works; registered models are built from the config.
    """

    template: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int

    def build(self) -> nn.Module:
        """A fresh, independent copy of the template."""
        return copy.deepcopy(self.template)


__all__ = ["ModelSpec", "build_model"]
