"""Exact top-k selection in linear time, and the one-pass magnitude threshold.

ZeroFL refreshes every sparsified weight and activation tensor's top-k every few steps, and the
pruning allocations rank whole models, so the selection must not dominate. On one CPU thread, a
stable sort of a ResNet-18 layer's 2.4M weights takes 0.9 s and ``torch.kthvalue`` 20 ms; on a
0.5M-entry ReLU output ``torch.kthvalue`` takes 8 ms and :func:`kth_largest` (a sample bound,
one numpy pass, introselect on what is left) about 1 ms. Counting entries at or above a
threshold goes through ``np.count_nonzero``: a boolean ``sum`` in torch converts to int64 first
and is 7x slower.

Tie rule everywhere: among entries equal to the threshold, the lower flat index is kept (the
order a stable descending sort gives), so every mask here is deterministic.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

#: below this many entries introselect runs on the whole tensor
SMALL = 1 << 16
#: target size of the bracketing sample
SAMPLE = 4096

_INT_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def _np(a: Tensor) -> np.ndarray:
    """A flat numpy view of ``a``'s values, or a copy for bfloat16, non-contiguous and non-CPU
    tensors."""
    a = a.detach()
    if a.device.type != "cpu":
        a = a.cpu()
    if a.dtype == torch.bfloat16:
        a = a.float()  # exact: every bfloat16 value is a float32
    return a.contiguous().numpy().reshape(-1)


def kth_largest(a: Tensor, k: int) -> float:
    """The exact k-th largest value of the tensor ``a`` (``1 <= k <= a.numel()``, no NaN).

    Large tensors: a fixed-stride sample (deterministic) gives a bound on the value, one
    vectorised pass keeps the entries on the value's side of it (the top of the tensor for the
    usual small top-k), and introselect runs on those only: on a whole ReLU output (half exact
    zeros) introselect can hit a slow path, 38 ms rather than 1.5 ms for the same 0.5M entries,
    depending on their order. When the bound misses (it cannot be wrong, only unlucky)
    ``torch.kthvalue`` selects from the whole tensor.
    """
    n = a.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} out of range for {n} values")
    r = n - k  # 0-based ascending rank
    arr = _np(a)
    if n <= SMALL:
        return float(np.partition(arr, r)[r])
    # an odd stride: a power-of-two one lines up with feature-map rows, and its bound misses
    sample = np.sort(arr[:: (n // SAMPLE) | 1])
    m = sample.size
    f = (r + 0.5) / n
    d = int(math.ceil(5.0 * math.sqrt(m * f * (1.0 - f)))) + 2
    if f >= 0.5:  # the value is among the largest entries: keep those above a lower bound
        bound = sample[max(int(f * m) - d, 0)]
        side = np.compress(arr > bound, arr)  # strictly: a bound many entries share (0.0) stays out
        j = r - (n - side.size)
        if j >= 0:
            return float(np.partition(side, j)[j])
        if j >= -int(np.count_nonzero(arr == bound)):
            return float(bound)  # the value is the bound itself
    else:  # among the smallest: keep those below an upper bound
        bound = sample[min(int(f * m) + d, m - 1)]
        side = np.compress(arr < bound, arr)
        if r < side.size:
            return float(np.partition(side, r)[r])
        if r < side.size + int(np.count_nonzero(arr == bound)):
            return float(bound)
    # the bound missed: torch's selection, slower than introselect at its best but never as
    # slow as introselect at its worst (38 ms on a ReLU output, above)
    return float(torch.kthvalue(torch.from_numpy(np.ascontiguousarray(arr)), r + 1).values)


def count_at_least(a: Tensor, tau: float) -> int:
    """How many entries of ``a`` are ``>= tau``."""
    return int(np.count_nonzero(_np(a) >= tau))


def topk_flat(a: Tensor, k: int) -> tuple[Tensor, float]:
    """The mask of the ``k`` largest entries of the 1-D tensor ``a`` (no NaN), and the k-th
    largest value ``tau``; ties at ``tau`` go to the lower flat index. ``k`` is clipped to
    ``[0, n]`` (``tau`` is ``inf`` for ``k = 0``)."""
    n = a.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=a.device), math.inf
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=a.device), float(a.min())
    tau = kth_largest(a, k)
    keep = a >= tau
    excess = int(np.count_nonzero(_np(keep))) - k
    if excess > 0:  # drop the highest-index ties
        ties = torch.nonzero(a == tau).flatten()
        keep[ties[ties.numel() - excess :]] = False
    return keep, tau


def nonzero_fraction(t: Tensor, max_exact: int = 8192, tau: float | None = None) -> float:
    """The fraction of nonzero entries of ``t``: exact up to ``max_exact`` entries, else measured
    on a fixed sample of ``max_exact`` entries in evenly spaced runs of 64 (deterministic).

    An exact count costs more than a :func:`shrink` pass on CPU (``torch.count_nonzero`` is
    not vectorised; a boolean sum converts to int64 first), so a training loop that wants the
    density of every sparsified tensor on every step samples the large ones. The standard error
    is about ``sqrt(d (1 - d) / max_exact)`` in absolute density ``d`` (0.0033 at ``d = 0.1``)
    when neighbouring entries are independent, more when they are correlated within a run.

    With ``tau``, the fraction of ``shrink(t, tau)`` (the same entries, so the same number),
    without building the shrunk tensor: only the sampled entries are shrunk.
    """
    n = t.numel()
    if n == 0:
        return 0.0
    flat = _flat_view(t)
    if n > max_exact:
        # evenly spaced runs of 64 entries: a single-entry stride reads one cache line per
        # sample, which costs as much as the sparsification pass itself
        runs = max(1, max_exact // 64)
        flat = flat.as_strided((runs, 64), (n // runs, 1))
    if tau is not None:
        flat = shrink(flat, tau)
    return int(flat.bool().sum()) / flat.numel()


def _flat_view(t: Tensor) -> Tensor:
    """A 1-D view of every entry of ``t`` (in memory order, so no copy for the layouts used)."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


@functools.lru_cache(maxsize=1024)
def below(tau: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` strictly below ``tau`` (``tau > 0`` finite, representable).

    Cached: the same threshold is shrunk every step, and numpy's scalar ``nextafter`` costs
    about 1 ms of a 130 ms ResNet-20 ZeroFL step over its 58 calls."""
    if dtype == torch.float32:
        return float(np.nextafter(np.float32(tau), np.float32(0)))
    if dtype == torch.float64:
        return math.nextafter(tau, 0.0)
    t = torch.tensor([tau], dtype=dtype)
    return float((t.view(_INT_OF[dtype]) - 1).view(dtype))


def shrink(v: Tensor, tau: float) -> Tensor:
    """``v`` where ``|v| >= tau``, else 0, in one pass (``tau == 0``: ``v`` itself, detached).

    ``hardshrink`` keeps ``|v| > lambd``; with ``lambd`` the next value below ``tau`` in ``v``'s
    dtype that is exactly ``|v| >= tau``.
    """
    v = v.detach()
    if tau <= 0:
        return v
    if v.dtype not in _INT_OF:
        return v * (v.abs() >= tau)
    return F.hardshrink(v, below(tau, v.dtype))


__all__ = ["below", "count_at_least", "kth_largest", "nonzero_fraction", "shrink", "topk_flat"]
