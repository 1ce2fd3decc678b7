"""Fast sparse training kernels: FedSkel's compact skeleton backward, a CSR sparse linear layer
with a per-layer kernel choice, and structured compaction (train the smaller network).

Every kernel computes what the masked reference computes (up to floating-point summation order);
which one runs is a speed decision only. Performance is measured by ``benchmarks/speed.py``.
"""

from sparsefl.kernels.skeleton import (
    SkeletonBatchNormFn,
    SkeletonConvFn,
    SkeletonLinearFn,
    conv_supported,
    skeleton_batch_norm,
    skeleton_conv,
    skeleton_linear,
    supports_skeleton_bn,
)

__all__ = [
    "SkeletonBatchNormFn",
    "SkeletonConvFn",
    "SkeletonLinearFn",
    "conv_supported",
    "skeleton_batch_norm",
    "skeleton_conv",
    "skeleton_linear",
    "supports_skeleton_bn",
]
