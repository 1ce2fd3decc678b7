"""Aggregation rules as pure functions over decoded updates.

Each takes the clients' decoded :class:`~sparsefl.comm.Update` values, their sample counts, and
(where needed) the current global tensors, and returns new tensors. The sparse rules differ in
what an unsent coordinate means, and so do the papers:

* ``zero_as_value``: an unsent value counts as 0 in the sample-weighted mean (ZeroFL Top-K-W);
  this pulls weights toward 0.
* ``per_coordinate``: average each coordinate over the clients that sent it (weights
  renormalised per coordinate, "average only over overlapping parameters" as in Hermes,
  LotteryFL and Sub-FedAvg); a coordinate nobody sent keeps the server's value.
* ``delta``: updates are deltas; an unsent delta is "no change":
  ``w + sum_k (n_k / n) d_k`` with ``n`` the total samples of the round's clients.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from sparsefl.comm import Update

Tensors = dict[str, torch.Tensor]


def weighted_mean(updates: Sequence[Update], num_examples: Sequence[int], names: list[str]) -> Tensors:
    """Sample-weighted mean of tensors every client sent (unsent coordinates count as 0).

    Sums in float64 in client order, then casts back, so the result does not depend on how
    floating-point additions are grouped elsewhere. Integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) take the weighted mean rounded down.
    """
    total = float(sum(num_examples))
    weights = [n / total for n in num_examples]
    out: Tensors = {}
    # the floating tensors that every client sent in one dtype are summed as one flat vector
    # per client: four tensor operations per client instead of three per client and tensor.
    # Each coordinate still gets the same float64 product and the same sums in client order,
    # so the result is bit for bit that of the per-tensor loop below.
    first = updates[0].values if updates else {}
    flat = [
        n
        for n in names
        if n in first
        and first[n].is_floating_point()
        and all(n in u.values and u.values[n].dtype == first[n].dtype for u in updates)
    ]
    if len(flat) > 1:
        size = sum(first[n].numel() for n in flat)
        acc = torch.zeros(size, dtype=torch.float64)
        raw = torch.empty(size, dtype=functools.reduce(torch.promote_types, (first[n].dtype for n in flat)))
        term = torch.empty(size, dtype=torch.float64)
        for u, w in zip(updates, weights):
            torch.cat([u.values[n].reshape(-1) for n in flat], out=raw)
            # widened, multiplied, added: not add_(alpha=w), a fused multiply-add rounds once
            # (and not numpy's one-pass widening multiply, which is 1.5x slower)
            acc += term.copy_(raw).mul_(w)
        for n, part in zip(flat, acc.split([first[n].numel() for n in flat])):
            out[n] = part.to(first[n].dtype, copy=True).reshape(first[n].shape)  # its own buffer
    for name in names:
        if name in out:
            continue
        ref = next(u.values[name] for u in updates if name in u.values)
        sent = [(u.values[name], w) for u, w in zip(updates, weights) if name in u.values]
        if ref.dim() == 0 and not ref.is_floating_point() and all(abs(int(v)) < 2**53 for v, _ in sent):
            # an integer scalar (BatchNorm's step count) in Python floats: the same float64
            # products and sums in the same order as the tensor loop below (exact conversions
            # below 2**53), without three tensor operations per client
            mean = 0.0
            for v, w in sent:
                mean += float(v) * w
            out[name] = torch.tensor(mean, dtype=torch.float64).floor().to(ref.dtype)  # (the loop's conversion)
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for u, w in zip(updates, weights):
            if name in u.values:
                acc += u.values[name].to(torch.float64) * w
        out[name] = acc.floor().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return {name: out[name] for name in names}


zero_as_value = weighted_mean


def per_coordinate(
    updates: Sequence[Update], num_examples: Sequence[int], current: Mapping[str, torch.Tensor], names: list[str]
) -> Tensors:
    """Average each coordinate over the clients that sent it; unsent by all -> current value."""
    out: Tensors = {}
    for name in names:
        cur = current[name]
        num = torch.zeros(cur.shape, dtype=torch.float64)
        den = torch.zeros(cur.shape, dtype=torch.float64)
        for u, n in zip(updates, num_examples):
            if name not in u.values:
                continue
            sent = u.sent.get(name)
            w = torch.full(cur.shape, float(n), dtype=torch.float64) if sent is None else sent.to(torch.float64) * n
            num += u.values[name].to(torch.float64) * w
            den += w
        res = torch.where(den > 0, num / den.clamp_min(1e-300), cur.to(torch.float64))
        out[name] = res.to(cur.dtype)
    return out


def delta(
    updates: Sequence[Update], num_examples: Sequence[int], current: Mapping[str, torch.Tensor], names: list[str]
) -> Tensors:
    """``w + sum_k (n_k / n) d_k`` with unsent deltas counting as zero."""
    mean = weighted_mean(updates, num_examples, names)
    return {n: (current[n].to(torch.float64) + mean[n].to(torch.float64)).to(current[n].dtype) for n in names}
