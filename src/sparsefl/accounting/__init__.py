"""Accounting: FLOPs by one written convention (see :mod:`sparsefl.accounting.flops`)."""

from sparsefl.accounting.flops import (
    FLOPS_PER_MAC,
    FlopCount,
    LayerDensity,
    LayerProfile,
    ModelProfile,
    inference_flops,
    profile_model,
    train_flops,
)

__all__ = [
    "FLOPS_PER_MAC",
    "FlopCount",
    "LayerDensity",
    "LayerProfile",
    "ModelProfile",
    "inference_flops",
    "profile_model",
    "train_flops",
]
