"""Allocation: turn per-weight scores into a mask at an exact target sparsity.

The second of the three swappable parts of pruning (score, **allocate**, schedule). Every rule
here is exact and deterministic:

* The kept count is ``K = N - floor(s * N)`` (``floor(s * N)`` is Global MP's ``k``, the number
  removed; a 1e-6 guard absorbs float round-off such as ``0.29 * 100 = 28.999...``).
* "The k largest" is taken with :func:`topk_mask`: the threshold is the exact k-th largest value
  (:func:`sparsefl.kernels.topk.kth_largest`: exact, linear time; not a histogram or an
  approximate quantile) and ties at the threshold go to the lower flat index, which is what a
  stable sort of ``(score descending, index)`` would give. NaN scores rank lowest. The kept
  count is therefore exactly ``K``, always.

The rules (``allocation=``) are ``global`` (one threshold with Gupta et al.'s minimum per
layer), ``layerwise``, ``erk`` and ``lamp``; :func:`allocate` describes each. ``prev_mask``
makes any rule monotone: weights it removed are never revived (gradual and iterative pruning).
A target below the previous mask's sparsity is an error.

The rate-distortion dynamic programme of Xu et al. is here too (:func:`rd_dp_allocate`); the
distortion curves it consumes come from :mod:`sparsefl.pruning.criteria.rd`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sparsefl.errors import ConfigError, SparseflError
from sparsefl.kernels import topk
from sparsefl.masks import Mask
from sparsefl.pruning.base import check_sparsity

Tensor = torch.Tensor

ALLOCATIONS: tuple[str, ...] = ("global", "layerwise", "erk", "lamp")

__all__ = [
    "ALLOCATIONS",
    "allocate",
    "erk_densities",
    "global_counts",
    "global_keep",
    "kth_largest",
    "lamp_scores",
    "mt_floors",
    "num_kept",
    "rd_dp_allocate",
    "topk_mask",
]


# --------------------------------------------------------------------------------------------------
# Exact top-k
# --------------------------------------------------------------------------------------------------


def num_kept(n: int, sparsity: float) -> int:
    """Weights kept out of ``n`` at ``sparsity``: ``n - floor(sparsity * n)``."""
    return n - min(n, math.floor(sparsity * n + 1e-6))


_LOWEST = -torch.finfo(torch.float64).max


def _clean(x: Tensor) -> Tensor:
    """Flat float64 CPU copy of ``x`` with NaN as the lowest finite value (NaN ranks below every
    real score; infinities are kept)."""
    x = x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    return torch.nan_to_num(x, nan=_LOWEST, posinf=math.inf, neginf=-math.inf)


def kth_largest(x: Tensor, k: int) -> float:
    """The exact k-th largest value of the 1-D tensor ``x`` (``1 <= k <= x.numel()``)."""
    return topk.kth_largest(_clean(x), k)


def topk_mask(x: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``x``) of its ``k`` largest entries; ties go to the lower flat index.

    Exactly ``min(max(k, 0), x.numel())`` entries are True. NaN ranks below everything.
    """
    return _topk_flat(_clean(x), k).view(x.shape)


def _topk_flat(flat: Tensor, k: int) -> Tensor:
    """:func:`topk_mask` of a flat float64 CPU tensor without NaN."""
    return topk.topk_flat(flat, k)[0]


# --------------------------------------------------------------------------------------------------
# Minimum threshold and the global rule
# --------------------------------------------------------------------------------------------------


def mt_floors(
    sizes: Mapping[str, int],
    min_keep: int = 1,
    min_keep_fraction: float = 0.0,
    budget: int | None = None,
) -> dict[str, int]:
    """Per-layer minimum kept counts of the MT rule.

    ``m = max(min_keep, floor(min_keep_fraction * N))`` with ``N = sum(sizes)`` (Gupta et al.'s
    ``--min-threshold`` is this fraction in percent, default 0.05 %); a layer with ``n_l <= m``
    keeps all its weights.

    ``min_keep`` is a hard floor. The fractional part scales with the model, not the target, and
    at extreme sparsity it can exceed the whole budget (0.05 % of N for 22 layers is more than
    the 1 % kept at 99 % sparsity); when ``budget`` is given, the fractional floor is then lowered
    to the largest uniform value whose floors still fit in ``budget`` (every layer keeps about
    ``budget / L``), instead of failing. The reference code has no such case.
    """
    total = sum(sizes.values())
    hard = int(min_keep)
    m = max(hard, math.floor(min_keep_fraction * total + 1e-9))

    def need(v: int) -> int:
        return sum(min(s, v) for s in sizes.values())

    if budget is not None and m > hard and need(m) > budget:
        lo, hi = hard, m  # need(lo) may still exceed budget: then the hard floor is reported
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if need(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        m = lo
    return {n: min(s, m) for n, s in sizes.items()}


def global_keep(scores: Mapping[str, Tensor], k: int, floors: Mapping[str, int] | None = None) -> dict[str, Tensor]:
    """The global top-``k`` with per-layer floors (MT rule), as flat boolean masks per layer.

    Parameters
    ----------
    scores:
        Per-layer scores (any shapes; -inf marks weights that may not be kept).
    k:
        Total kept count.
    floors:
        Minimum kept count per layer; ``sum(floors) <= k`` is required.

    Returns
    -------
    dict
        Flat kept-masks with exactly ``k`` True in all; a layer pinned at its floor keeps its
        ``floor`` highest scores, the others share the rest by one exact global threshold.
    """
    names = list(scores)
    floors = {n: 0 for n in names} if floors is None else dict(floors)
    if sum(floors.values()) > k:
        raise ConfigError(
            "min_keep",
            sum(floors.values()),
            f"per-layer minimums that sum to at most the {k} weights kept at this sparsity "
            "(lower min_keep / min_keep_fraction)",
        )
    return _global_keep_flat({n: _clean(scores[n]) for n in names}, k, floors)


def _global_keep_flat(flat: Mapping[str, Tensor], k: int, floors: Mapping[str, int]) -> dict[str, Tensor]:
    """:func:`global_keep` on flat float64 CPU scores without NaN (floors already checked)."""
    names = list(flat)
    pinned: dict[str, Tensor] = {}
    while True:
        free = [n for n in names if n not in pinned]
        budget = k - sum(floors[n] for n in pinned)
        keeps = dict(pinned)
        if free:
            cat = torch.cat([flat[n] for n in free]) if len(free) > 1 else flat[free[0]]
            keep = _topk_flat(cat, budget)
            for n, part in zip(free, torch.split(keep, [flat[n].numel() for n in free])):
                keeps[n] = part
        short = [n for n in free if int(torch.count_nonzero(keeps[n])) < floors[n]]
        if not short:
            return {n: keeps[n] for n in names}
        for n in short:
            pinned[n] = _topk_flat(flat[n], floors[n])


def global_counts(scores: Mapping[str, Tensor], k: int, floors: Mapping[str, int] | None = None) -> dict[str, int]:
    """Per-layer kept counts of :func:`global_keep` (summing to exactly ``k``)."""
    return {n: int(torch.count_nonzero(m)) for n, m in global_keep(scores, k, floors).items()}


# --------------------------------------------------------------------------------------------------
# ERK and LAMP
# --------------------------------------------------------------------------------------------------


def erk_densities(
    shapes: Mapping[str, Sequence[int]], density: float, erk_power_scale: float = 1.0
) -> dict[str, float]:
    """Erdos-Renyi-Kernel layer densities (RigL's ``get_sparsities_erdos_renyi``).

    A layer of shape ``(d_1, ..., d_k)`` gets density ``eps * (sum(d) / prod(d)) ** power``, with
    ``eps`` chosen so that the kept weights total ``density * N``. A layer whose density would
    exceed 1 is made dense and ``eps`` is solved again over the others (RigL's loop: the layer(s)
    with the largest ratio become dense, repeat).

    Parameters
    ----------
    shapes:
        Layer name -> weight shape.
    density:
        Target global density (fraction of all weights kept), ``0 < density <= 1``.
    erk_power_scale:
        Exponent on the Erdos-Renyi ratio (1.0 = ERK; 0 = uniform).

    Returns
    -------
    dict
        Layer name -> density (fraction of that layer's weights kept).
    """
    if not 0 < density <= 1:
        raise ConfigError("density", density, "a number with 0 < density <= 1")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    if density >= 1:
        return {n: 1.0 for n in shapes}
    total = sum(sizes.values())
    dense: set[str] = set()
    eps = 0.0
    raw: dict[str, float] = {}
    while True:
        raw = {n: (sum(s) / sizes[n]) ** erk_power_scale for n, s in shapes.items() if n not in dense}
        if not raw:
            break
        rhs = density * total - sum(sizes[n] for n in dense)
        divisor = sum(raw[n] * sizes[n] for n in raw)
        eps = rhs / divisor
        max_raw = max(raw.values())
        if eps * max_raw > 1:
            dense |= {n for n, r in raw.items() if r == max_raw}
            continue
        break
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def lamp_scores(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LAMP normalisation: within each layer, ``v_u / sum_{v >= u} v_v`` in ascending order.

    For ``v = w**2`` these are the LAMP scores of Lee et al. (ICLR 2021): the largest value of
    every layer scores 1, so a global threshold never empties a layer. Equal values are ordered
    by index (stable sort), as a stable argsort would; a suffix of zeros scores 0. Values must be
    non-negative; the result is float64.
    """
    out: dict[str, Tensor] = {}
    for n, s in scores.items():
        v = s.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if bool((~(v >= 0)).any()):
            raise ConfigError("allocation", "lamp", f"non-negative scores (LAMP normalises magnitudes; {n!r} has not)")
        order = torch.sort(v, stable=True).indices
        sorted_v = v[order]
        suffix = torch.flip(torch.cumsum(torch.flip(sorted_v, [0]), 0), [0])
        ratio = torch.where(suffix > 0, sorted_v / suffix.clamp_min(1e-300), torch.zeros_like(suffix))
        res = torch.empty_like(v)
        res[order] = ratio
        out[n] = res.view(s.shape)
    return out


# --------------------------------------------------------------------------------------------------
# allocate
# --------------------------------------------------------------------------------------------------


def _distribute(targets: Mapping[str, float], caps: Mapping[str, int], k: int) -> dict[str, int]:
    """Integer counts within ``caps`` summing to ``k``, each within one of its real ``target``
    where caps allow (largest remainder; ties by order)."""
    counts = {n: min(caps[n], math.floor(t + 1e-9)) for n, t in targets.items()}
    rest = k - sum(counts.values())
    order = sorted(targets, key=lambda n: -(targets[n] - math.floor(targets[n] + 1e-9)))
    while rest > 0:
        progressed = False
        for n in order:
            if rest == 0:
                break
            if counts[n] < caps[n]:
                counts[n] += 1
                rest -= 1
                progressed = True
        if not progressed:
            raise ConfigError("sparsity", k, "a kept count the allowed weights can hold")
    while rest < 0:  # only when targets exceed k (never for ERK); remove from the smallest parts
        for n in reversed(order):
            if rest == 0:
                break
            if counts[n] > 0:
                counts[n] -= 1
                rest += 1
    return counts


def allocate(
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    allocation: str = "global",
    min_keep: int = 1,
    min_keep_fraction: float = 0.0,
    erk_power_scale: float = 1.0,
    prev_mask: Mapping[str, Tensor] | None = None,
) -> Mask:
    """Turn scores (higher = more important) into a mask with exactly the target kept count.

    Parameters
    ----------
    scores:
        state_dict name -> scores shaped like the weight. The mask covers exactly these names.
    sparsity:
        Fraction of all scored weights removed, ``0 <= sparsity < 1``. For ``layerwise`` each
        layer is pruned to it; otherwise the total kept count is ``N - floor(sparsity * N)``.
    allocation:
        ``global`` (default), ``layerwise``, ``erk`` or ``lamp`` (see Notes).
    min_keep, min_keep_fraction:
        The MT rule's per-layer minimum (global and lamp): each layer keeps at least
        ``max(min_keep, floor(min_keep_fraction * N))`` weights. ``min_keep=1`` (default) only
        guarantees that no layer is emptied; set 0 for the unguarded originals.
    erk_power_scale:
        Exponent of the ERK ratio (``erk`` only).
    prev_mask:
        Weights this mask removed stay removed (monotone masks); its names must cover ``scores``.

    Returns
    -------
    Mask
        True = kept.

    Notes
    -----
    The rules:

    ``global``
        One threshold over all layers' scores, with the minimum-threshold (MT) rule of Gupta et
        al. (arXiv 2209.14624): each layer keeps at least ``max(min_keep, floor(min_keep_fraction
        * N))`` weights (a layer smaller than that stays dense; a fractional floor too big for the
        budget is lowered to fit, see :func:`mt_floors`). Their code rescales per-layer
        sparsities until the target is met again; :func:`global_counts` does the same exactly:
        layers that the global threshold leaves below their floor are pinned at the floor, and
        the threshold is recomputed over the remaining layers with the remaining budget, until no
        layer falls short.
    ``layerwise``
        Each layer pruned to the same sparsity ``s`` (its own kept count is exact).
    ``erk``
        Erdos-Renyi-Kernel densities (RigL, Evci et al. 2020; :func:`erk_densities`), then
        per-layer top-k. Per-layer counts are rounded by largest remainder so the global count is
        exact and each layer is within one weight of its ERK density.
    ``lamp``
        LAMP (Lee et al., ICLR 2021): scores normalised within each layer by
        ``v_u / sum_{v >= u} v_v`` (ascending order; :func:`lamp_scores`), then the global rule.
    """
    sparsity = check_sparsity(sparsity)
    if allocation not in ALLOCATIONS:
        raise ConfigError("allocation", allocation, "one of: " + ", ".join(ALLOCATIONS))
    if not scores:
        raise ConfigError("scores", {}, "scores for at least one tensor")
    names = list(scores)
    prepared: dict[str, Tensor] = {}
    for n in names:
        s = scores[n]
        if not isinstance(s, Tensor) or not (s.is_floating_point() or s.dtype == torch.bool):
            raise ConfigError(f"scores.{n}", type(s).__name__, "a floating-point tensor")
        elig = torch.ones(s.numel(), dtype=torch.bool)
        if prev_mask is not None:
            if n not in prev_mask:
                raise ConfigError("prev_mask", n, "a mask that names every scored tensor")
            pm = prev_mask[n]
            if tuple(pm.shape) != tuple(s.shape):
                raise ConfigError(f"prev_mask.{n}", tuple(pm.shape), f"the scored tensor's shape {tuple(s.shape)}")
            elig = pm.reshape(-1).to(device="cpu", dtype=torch.bool)
        if allocation == "lamp":
            # normalise over the surviving weights only
            x = lamp_scores({n: torch.where(elig, s.detach().reshape(-1).cpu(), 0)})[n]
        else:
            x = _clean(s)
            x = torch.where(x == -math.inf, _LOWEST, x)  # -inf is reserved for removed weights
        prepared[n] = torch.where(elig, x, -math.inf)
    sizes = {n: scores[n].numel() for n in names}
    eligible = {n: (int(torch.count_nonzero(prev_mask[n])) if prev_mask is not None else sizes[n]) for n in names}
    total = sum(sizes.values())

    def shrink_error() -> ConfigError:
        prev = 1 - sum(eligible.values()) / total
        return ConfigError(
            "sparsity", sparsity, f"at least the previous mask's sparsity ({prev:.6f}): masks only shrink"
        )

    if allocation == "layerwise":
        counts = {n: num_kept(sizes[n], sparsity) for n in names}
    else:
        k = num_kept(total, sparsity)
        if k > sum(eligible.values()):
            raise shrink_error()
        if allocation == "erk":
            dens = erk_densities({n: tuple(scores[n].shape) for n in names}, 1.0 - sparsity, erk_power_scale)
            counts = _distribute({n: dens[n] * sizes[n] for n in names}, eligible, k)
        else:
            floors = mt_floors(sizes, min_keep, min_keep_fraction, budget=k)
            floors = {n: min(floors[n], eligible[n]) for n in names}
            need = sum(floors.values())
            if need > k:  # the sparsity is what the user set, so the error names it, not min_keep
                limit = math.floor((total - need) / total * 1e8) / 1e8
                raise ConfigError(
                    "sparsity",
                    sparsity,
                    f"at most {limit:.8g} here (method.sparsity in a run, --sparsity in sparsefl prune): "
                    f"with min_keep={min_keep} the {len(names)} layers keep at least {need} of the {total} "
                    "weights",
                )
            keeps = _global_keep_flat(prepared, k, floors)
            return Mask({n: keeps[n].view(scores[n].shape) for n in names})
    if any(counts[n] > eligible[n] for n in names):
        raise shrink_error()
    return Mask({n: _topk_flat(prepared[n], counts[n]).view(scores[n].shape) for n in names})


# --------------------------------------------------------------------------------------------------
# Rate-distortion dynamic programme
# --------------------------------------------------------------------------------------------------


def rd_dp_allocate(
    candidates: Mapping[str, Sequence[tuple[int, float]]], budget: int, *, buckets: int = 4096
) -> dict[str, int]:
    """Choose one ``(kept, distortion)`` option per layer minimising the summed distortion
    subject to ``sum(kept) <= budget`` (Xu et al., ICCV 2023, ``dp_pruning``).

    The state is the number of surviving weights. So that the table stays small for big models,
    that axis is bucketed: one unit is ``u = max(1, ceil(budget / buckets))`` weights, the budget
    is ``floor(budget / u)`` units, and an option keeping ``k`` weights costs ``ceil(k / u)``
    units. Costs are rounded up, so the chosen counts never exceed ``budget``; the shortfall is
    below ``len(candidates) * u`` weights (0 when ``budget <= buckets``), and the caller fills it
    (the rate-distortion criterion regrows the largest-magnitude removed weights). The table is
    ``O(L * buckets)`` and each layer costs ``O(options * buckets)`` vectorised operations.

    ``g[l][S]`` is the least distortion of the first ``l`` layers using exactly ``S`` units; the
    answer is the least ``g[L][S]`` over ``S <= budget`` units (budget "at most", like the
    reference's backtracking from the target), backtracked. Ties go to the earlier option of a
    layer, then to the larger ``S``.

    Parameters
    ----------
    candidates:
        Layer -> options ``(kept weights, distortion)``.
    budget:
        Total kept weights allowed.
    buckets:
        Resolution of the budget axis.

    Returns
    -------
    dict
        Layer -> chosen kept count.
    """
    if buckets < 1:
        raise ConfigError("buckets", buckets, "an integer >= 1")
    names = list(candidates)
    if not names:
        return {}
    unit = max(1, math.ceil(budget / buckets))
    cap = budget // unit
    g = np.full(cap + 1, np.inf)
    g[0] = 0.0
    choices: list[np.ndarray] = []
    for n in names:
        opts = candidates[n]
        if not opts:
            raise ConfigError("candidates", n, "at least one (kept, distortion) option per layer")
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for j, (kept, dist) in enumerate(opts):
            c = math.ceil(kept / unit)
            if c > cap:
                continue
            shifted = g[: cap + 1 - c] + float(dist)
            target = new[c:]
            better = shifted < target
            target[better] = shifted[better]
            arg[c:][better] = j
        g = new
        choices.append(arg)
    finite = np.isfinite(g)
    if not finite.any():
        raise SparseflError(f"rate-distortion DP: no combination of per-layer options keeps at most {budget} weights")
    best = float(g[finite].min())
    s = int(np.flatnonzero(finite & (g == best)).max())
    out: dict[str, int] = {}
    for n, arg in zip(reversed(names), reversed(choices)):
        j = int(arg[s])
        kept = int(candidates[n][j][0])
        out[n] = kept
        s -= math.ceil(kept / unit)
    return {n: out[n] for n in names}
