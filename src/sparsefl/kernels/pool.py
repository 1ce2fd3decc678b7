"""Max pooling that runs the channels_last kernel on NCHW tensors, with the same bits.

On CPU, torch's NCHW max-pool forward is a scalar loop: 2x2 pooling of a (32, 32, 8, 8) batch
takes 0.5-0.66 ms, against about 0.05 ms for the vectorised channels_last kernel. In the default
CNN, that one op on the NCHW kernel is a fifth of a training step and half of an evaluation.

:class:`MaxPool2d` converts the input to channels_last, pools there, and returns NCHW output.
The backward scatters through the indices with the NCHW kernel, so the gradient reaching the
ReLU before the pool stays NCHW; a channels_last gradient there makes the ReLU backward 5x slower.

Both forward kernels keep the first maximum in a window, scanning rows then columns, and
propagate NaN. So the output, the indices and the gradient are bit-identical to
``nn.MaxPool2d``. ``tests/kernels/test_pool.py`` checks this with ties and NaN, and the default
run's ``model_sha256`` is the same with either kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CL = torch.channels_last


class _MaxPool2dCL(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conf: tuple) -> torch.Tensor:  # type: ignore[override]
        out, idx = torch.ops.aten.max_pool2d_with_indices(x.contiguous(memory_format=_CL), *conf)
        ctx.conf = conf
        ctx.save_for_backward(x, idx.contiguous())
        return out.contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        x, idx = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.conf, idx), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, state and results), faster on NCHW float batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_indices or x.dim() != 4 or not x.is_contiguous() or not x.is_floating_point():
            return super().forward(x)  # channels_last input (bf16 training) is already fast
        if x.device.type != "cpu" or torch._C._are_functorch_transforms_active():
            return super().forward(x)  # a CPU kernel choice; torch.func (the batched executor) needs the plain op
        k, s, p, d = (nn.modules.utils._pair(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        conf = (k, s, p, d, self.ceil_mode)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPool2dCL.apply(x, conf)
        return F.max_pool2d(x.contiguous(memory_format=_CL), *conf).contiguous()
