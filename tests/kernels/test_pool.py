"""sparsefl.kernels.pool.MaxPool2d gives nn.MaxPool2d's bits: output, gradient, ties, NaN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefl.config import ModelConfig
from sparsefl.kernels.pool import MaxPool2d
from sparsefl.kernels.structured import compact
from sparsefl.models import build_model


def _input(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(shape, generator=g)).to(dtype)  # about half zeros: ties in most windows
    x[..., ::3, ::2] = x[..., :1, :1]  # and repeated values within windows
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,args",
    [
        ((4, 3, 8, 8), dict(kernel_size=2)),
        ((2, 5, 7, 9), dict(kernel_size=3, stride=2, padding=1)),
        ((2, 4, 7, 7), dict(kernel_size=2, ceil_mode=True)),
        ((3, 2, 9, 6), dict(kernel_size=(3, 2), stride=(1, 2), dilation=(2, 1))),
    ],
)
def test_max_pool_bit_identical_forward_and_backward(shape: tuple[int, ...], args: dict, dtype: torch.dtype) -> None:
    x = _input(shape, 0, dtype)
    if dtype != torch.bfloat16:
        x[0, 0, 1, 1] = float("nan")
    ref_pool, fast_pool = nn.MaxPool2d(**args), MaxPool2d(**args)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref_pool(xa), fast_pool(xb)
    assert yb.is_contiguous()
    assert torch.equal(ya.nan_to_num(-7.0), yb.nan_to_num(-7.0))
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ya.backward(g)
    yb.backward(g)
    assert xb.grad is not None and xb.grad.is_contiguous()
    assert torch.equal(xa.grad, xb.grad)
    with torch.no_grad():  # the evaluation path
        assert torch.equal(ref_pool(x).nan_to_num(-7.0), fast_pool(x).nan_to_num(-7.0))


def test_max_pool_falls_back_where_it_would_not_help() -> None:
    x = _input((2, 3, 6, 6), 2, torch.float32)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(MaxPool2d(2)(cl), nn.MaxPool2d(2)(cl))
    out, idx = MaxPool2d(2, return_indices=True)(x)
    ref_out, ref_idx = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    x3 = _input((3, 6, 6), 3, torch.float32)  # unbatched
    assert torch.equal(MaxPool2d(2)(x3), nn.MaxPool2d(2)(x3))


def test_models_use_it_and_structured_compaction_traces_through_it() -> None:
    model = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=0)
    assert isinstance(model.pool, MaxPool2d)
    keep = {"conv1.weight": torch.arange(32) % 2 == 0, "conv2.weight": torch.arange(64) % 4 == 0}
    small, _ = compact(model, keep, (1, 8, 8))
    assert any(isinstance(m, MaxPool2d) for m in small.modules())
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)
