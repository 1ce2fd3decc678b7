"""The shared exact top-k: against a stable sort and torch.kthvalue."""

from __future__ import annotations

import pytest
import torch

from sparsefl.kernels import topk


def _reference(a: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[torch.sort(a, descending=True, stable=True).indices[:k]] = True
    return keep


@pytest.mark.parametrize("n", [1000, 200_003])
@pytest.mark.parametrize("kind", ["normal", "ties", "relu", "constant"])
def test_topk_flat_equals_stable_sort(n: int, kind: str) -> None:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=g).abs()
    if kind == "ties":
        a = torch.round(a * 4) / 4  # few distinct values: many ties at every threshold
    elif kind == "relu":
        a = torch.relu(torch.randn(n, generator=g) - 1.0)  # mostly zeros
    elif kind == "constant":
        a = torch.full((n,), 0.5)
    for frac in (0.001, 0.05, 0.1, 0.5, 0.95):
        k = max(1, int(frac * n))
        mask, tau = topk.topk_flat(a, k)
        assert torch.equal(mask, _reference(a, k)), (kind, frac)
        assert tau == float(torch.kthvalue(a, n - k + 1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kth_largest_equals_kthvalue_in_every_dtype(dtype: torch.dtype) -> None:
    n = 1 << 17
    a = torch.zeros(n)
    a[1::2] = torch.arange(n // 2, dtype=torch.float32) / 7
    a = a.to(dtype).view(8, -1)  # any shape: the flat entries count
    for k in (1, 10, n // 4, n // 2 + 3, n):
        assert topk.kth_largest(a, k) == float(torch.kthvalue(a.flatten().float(), n - k + 1).values)
        assert topk.count_at_least(a, topk.kth_largest(a, k)) == int((a >= topk.kth_largest(a, k)).sum())
    with pytest.raises(ValueError, match="out of range"):
        topk.kth_largest(a, 0)


def test_kth_largest_when_the_sample_misleads() -> None:
    """Every sampled entry is far above the rest: the bound misses and the whole tensor is
    selected; a ReLU-like tensor (half zeros, in runs) takes the bounded path; in a tensor of
    95% zeros the value is often the bound itself (k at or above the nonzero count). All exact."""
    n = 1 << 17
    a = torch.arange(n, dtype=torch.float32) / n
    a[:: (n // topk.SAMPLE) | 1] = 1e6
    relu = torch.relu(torch.sin(torch.arange(n, dtype=torch.float32) / 50))
    sparse = torch.relu(torch.randn(n, generator=torch.Generator().manual_seed(9)) - 1.6)  # 95% zeros
    for t in (a, relu, sparse):
        for k in (1, 10, n // 10, n // 2, n - 3, n):
            assert topk.kth_largest(t, k) == float(torch.kthvalue(t, n - k + 1).values), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shrink_keeps_exactly_magnitude_at_or_above_tau(dtype: torch.dtype) -> None:
    v = torch.tensor([0.5, -0.5, 0.499, -0.51, 0.0, 2.0], dtype=dtype)
    out = topk.shrink(v, float(v[0]))
    ref = v * (v.abs() >= v[0])
    assert torch.equal(out, ref) and out.dtype == dtype
    assert torch.equal(topk.shrink(v, 0.0), v)
    assert topk.below(0.5, dtype) < 0.5


def test_nonzero_fraction_exact_when_small_and_close_when_sampled() -> None:
    g = torch.Generator().manual_seed(5)
    small = torch.relu(torch.randn(4000, generator=g))
    assert topk.nonzero_fraction(small) == int((small != 0).sum()) / small.numel()
    big = torch.relu(torch.randn(32, 16, 32, 32, generator=g) - 1.2)  # about 11.5% nonzero
    exact = float((big != 0).float().mean())
    assert abs(topk.nonzero_fraction(big) - exact) < 0.02
    cl = big.contiguous(memory_format=torch.channels_last)
    assert abs(topk.nonzero_fraction(cl) - exact) < 0.02
