"""Models without torchvision: mlp, cnn (LeNet-style), CIFAR-style resnet8/20/32, resnet18
(3x3 stem), vgg11/vgg16 with BatchNorm. Input shape and class count come from the data.

Every builder has the signature ``(input_shape, num_classes, width) -> nn.Module``; the Python
API accepts any user ``nn.Module`` in their place.
"""

from __future__ import annotations

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


__all__ = ["build_model"]
