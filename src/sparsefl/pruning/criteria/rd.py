"""Layer-adaptive rate-distortion pruning (Xu et al., ICCV 2023).

"Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks"
(arXiv 2308.10438; code Akimoto-Cris/RD_PRUNE). The per-layer pruning amounts are chosen to
minimise the output distortion, which is approximated as the sum of single-layer distortions,
subject to the global kept-weights budget:

1. :func:`rd_curves` -- for every scope layer ``l`` and grid amount ``a`` in ``{0, 1/K, ..., 1}``
   magnitude-prune layer ``l`` alone to ``a`` and measure ``delta_l(a)``, the mean (or, with
   ``worst_case``, the max) over calibration samples of the per-sample MSE between the original
   and the pruned logits.
2. :func:`~sparsefl.pruning.allocation.rd_dp_allocate` -- a dynamic programme over layers picks
   one amount per layer minimising ``sum_l delta_l(a_l)`` with ``sum_l kept_l <= budget``.
3. Magnitude masks at the chosen amounts; the few weights the DP's bucketing leaves unused are
   regrown by global magnitude so the mask meets the target exactly.

Curves, DP and mask are separate functions so a federation can split them: clients compute
:func:`rd_curves` on their data (same ``prev_mask``, hence the same kept counts), the server
averages the distortions, solves :func:`~sparsefl.pruning.allocation.rd_dp_allocate` and builds
the mask with :func:`rd_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsefl.config import opt
from sparsefl.errors import ConfigError
from sparsefl.masks import Mask
from sparsefl.pruning.allocation import global_counts, num_kept, rd_dp_allocate, topk_mask
from sparsefl.pruning.base import (
    Criterion,
    PruneContext,
    ScopeOptions,
    object_opt,
    register_criterion,
)
from sparsefl.pruning.schedules import exponential_densities
from sparsefl.rng import torch_gen

Tensor = torch.Tensor


@dataclass(frozen=True)
class RdOptions(ScopeOptions):
    """Rate-distortion options (defaults: RD_PRUNE's CIFAR settings where they exist)."""

    grid: int = opt(100, "grid size K: amounts 0, 1/K, ..., 1 (RD_PRUNE maxsps = 100)", ge=1)
    calib_samples: int = opt(256, "calibration samples (from data, else N(0,1) inputs)", ge=1)
    worst_case: bool = opt(False, "distortion = max over samples instead of the mean")
    iterations: int = opt(1, "prune in this many geometric steps, curves recomputed each time", ge=1)
    buckets: int = opt(4096, "resolution of the DP's surviving-weights axis", ge=1)
    min_keep: int = opt(1, "weights every layer keeps at least", ge=0)
    batch_size: int = opt(256, "forward-pass chunk size for the calibration samples", ge=1)
    input_shape: tuple[int, ...] | None = opt(None, "shape of one input sample (random inputs)")
    prev_mask: Mapping[str, Tensor] | None = object_opt(
        None, "the previous iteration's mask: no layer's amount goes below its previous amount"
    )


@dataclass(frozen=True)
class RdCurve:
    """One layer's options: kept counts (descending) and the distortion of each."""

    kept: list[int]
    distortion: list[float]
    order: Tensor = field(repr=False)  # flat indices by descending |w| (eligible first)


def _order(weight: Tensor, eligible: Tensor) -> Tensor:
    """Flat indices by descending ``|w|``; removed (ineligible) weights last; ties by index."""
    key = weight.detach().abs().reshape(-1).to(torch.float64).cpu()
    key = torch.where(eligible.reshape(-1), key, torch.full_like(key, -1.0))
    return torch.sort(-key, stable=True).indices


def _outputs(net: nn.Module, inputs: Tensor, batch_size: int) -> Tensor:
    outs = [net(inputs[i : i + batch_size]).flatten(1) for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs).to(torch.float64)


@torch.no_grad()
def rd_curves(
    net: nn.Module,
    scope: list[str],
    inputs: Tensor,
    *,
    grid: int = 100,
    prev_mask: Mapping[str, Tensor] | None = None,
    min_keep: int = 1,
    worst_case: bool = False,
    batch_size: int = 256,
) -> dict[str, RdCurve]:
    """Single-layer rate-distortion curves of ``net``, run as it is (use eval mode).

    Cost: one forward pass of ``inputs`` per layer and grid point, ``O(L * K)`` in all (about a
    minute for ResNet-20 on 256 8x8 inputs with ``K = 100`` on one CPU core).

    ``net`` is changed in place: ``prev_mask`` is applied to it (each layer's trial pruning is
    undone), so pass a copy. For layer ``l`` with ``n_l`` weights, of which ``e_l`` survive
    ``prev_mask``, the options are keeping ``e_l`` (distortion 0: nothing new pruned) and every grid count
    ``max(n_l - floor(i / K * n_l), min(min_keep, e_l)) < e_l`` (the grid's amount 1 becomes
    "keep ``min_keep``"). A count ``k`` keeps the ``k`` largest surviving ``|w|``. The reference
    output is that of the network with ``prev_mask`` applied.
    """
    state = net.state_dict(keep_vars=True)
    weights = {n: state[n] for n in scope}
    if prev_mask is not None:
        for n, w in weights.items():
            w.mul_(prev_mask[n].to(device=w.device, dtype=w.dtype))
    reference = _outputs(net, inputs, batch_size)
    curves: dict[str, RdCurve] = {}
    for n in scope:
        w = weights[n]
        original = w.detach().clone()
        size = w.numel()
        eligible = prev_mask[n].to(torch.bool).cpu() if prev_mask is not None else torch.ones(w.shape, dtype=torch.bool)
        e = int(eligible.sum())
        floor_l = min(min_keep, e)
        order = _order(original, eligible)
        grid_counts = (size - math.floor(i / grid * size + 1e-9) for i in range(grid + 1))
        counts = sorted({e} | {max(k, floor_l) for k in grid_counts if max(k, floor_l) < e}, reverse=True)
        dist = [0.0]
        flat = original.reshape(-1)
        for k in counts[1:]:
            pruned = torch.zeros_like(flat)
            idx = order[:k].to(flat.device)
            pruned[idx] = flat[idx]
            w.copy_(pruned.view_as(w))
            out = _outputs(net, inputs, batch_size)
            per_sample = ((out - reference) ** 2).mean(dim=1)
            dist.append(float(per_sample.max() if worst_case else per_sample.mean()))
        w.copy_(original)
        curves[n] = RdCurve(kept=counts, distortion=dist, order=order)
    return curves


def _calibration_inputs(ctx: PruneContext, o: RdOptions) -> Tensor:
    if ctx.batches is not None:
        xs = torch.cat([x for x, _ in ctx.batches])[: o.calib_samples]
        return xs
    shape = ctx.input_shape(o.input_shape)
    x = torch.randn((o.calib_samples, *shape), generator=torch_gen(ctx.seed, "rd", "calibration"))
    return x.to(ctx.device)


@register_criterion("rd")
class RdCriterion(Criterion):
    """Rate-distortion (Xu et al., ICCV 2023): layer amounts by DP over output-distortion curves.

    See the module docstring for the method. Choices and departures:

    * Calibration: the first ``calib_samples`` inputs of ``data`` (256 by default; the reference
      uses 1024 on CIFAR and 256 on ImageNet) or, without data, ``calib_samples`` N(0,1) inputs of
      ``input_shape`` (the reference's zero-data ``--synth_data`` variant). Targets are unused.
    * The network runs in eval mode (running BatchNorm statistics), as the reference evaluates.
    * Distortion is the mean per-sample MSE of the flattened outputs; ``worst_case=True`` takes the
      max over samples (the reference README's ``--worst_case_curve``).
    * DP budget discretisation: the surviving-weights axis is bucketed into at most ``buckets``
      units (:func:`~sparsefl.pruning.allocation.rd_dp_allocate`); costs round up, so the DP never
      overshoots, and the remaining weights (fewer than ``L`` units) are regrown by global ``|w|``
      among the weights the DP removed (never among those ``prev_mask`` removed), ties by
      position. The final kept count is exactly ``N - floor(s * N)``.
    * Monotone: with ``prev_mask`` every layer's amount is at least its previous amount (the
      previous kept count is always an option, at distortion 0) and removed weights stay removed.
      ``iterations > 1`` prunes in geometric steps (density ``d_0 (d / d_0) ** (t / T)``, the
      reference's ``1 - (1 - amount) ** t``) without retraining in between, recomputing curves.
    * ``min_keep=1``: a layer is never emptied (the grid's amount 1 is excluded).

    Not score-based: :func:`~sparsefl.pruning.score` raises for ``rd``; use :func:`rd_curves` and
    :func:`~sparsefl.pruning.allocation.rd_dp_allocate` to split the work.
    """

    Options = RdOptions
    has_scores = False

    def prune(self, ctx: PruneContext, sparsity: float) -> Mask:
        o = self.options
        inputs = _calibration_inputs(ctx, o)
        sizes = {n: ctx.model.state_dict()[n].numel() for n in ctx.scope}
        total = sum(sizes.values())
        mask: Mask | None = None
        if o.prev_mask is not None:
            mask = Mask({n: o.prev_mask[n] for n in ctx.scope})
        start = 1.0 if mask is None else mask.density()
        if mask is not None and num_kept(total, sparsity) > mask.num_kept():
            raise ConfigError(
                "sparsity",
                sparsity,
                f"at least the previous mask's sparsity ({1 - start:.6f}): masks only shrink",
            )
        schedule = exponential_densities(1.0 - sparsity, o.iterations, max(start, 1.0 - sparsity))
        for t, density in enumerate(schedule):
            s_t = sparsity if t == len(schedule) - 1 else 1.0 - density
            budget = num_kept(total, s_t)
            if mask is not None:
                budget = min(budget, mask.num_kept())
            mask = self._one_step(ctx, inputs, budget, mask)
        assert mask is not None
        return mask

    def _one_step(self, ctx: PruneContext, inputs: Tensor, budget: int, prev: Mask | None) -> Mask:
        o = self.options
        net = ctx.working_copy(train=False)
        for p in net.parameters():
            p.requires_grad_(False)
        curves = rd_curves(
            net,
            ctx.scope,
            inputs,
            grid=o.grid,
            prev_mask=prev,
            min_keep=o.min_keep,
            worst_case=o.worst_case,
            batch_size=o.batch_size,
        )
        table = {n: list(zip(c.kept, c.distortion)) for n, c in curves.items()}
        if sum(c.kept[-1] for c in curves.values()) > budget:
            raise ConfigError("rd.min_keep", o.min_keep, f"per-layer minimums that fit in {budget} kept weights")
        chosen = rd_dp_allocate(table, budget, buckets=o.buckets)
        return rd_mask(ctx.weights(), chosen, budget, prev_mask=prev)


def rd_mask(
    weights: Mapping[str, Tensor],
    kept: Mapping[str, int],
    budget: int,
    *,
    prev_mask: Mapping[str, Tensor] | None = None,
) -> Mask:
    """The mask of the DP's per-layer counts, topped up to exactly ``budget`` kept weights.

    Layer ``l`` keeps its ``kept[l]`` largest ``|w|`` among the weights ``prev_mask`` left (ties by
    index). If the counts sum to less than ``budget`` (the DP's bucketing rounds costs up), the
    shortfall is regrown by global ``|w|`` among the weights just removed (the boundary weights;
    never those ``prev_mask`` removed), ties by (layer, index) position.

    Parameters
    ----------
    weights:
        Scope name -> weight tensor (the original, not the prev-masked, values are fine: removed
        weights are excluded through ``prev_mask``).
    kept:
        Scope name -> kept count (e.g. from :func:`~sparsefl.pruning.allocation.rd_dp_allocate`).
    budget:
        Total kept count wanted (at least ``sum(kept)``).
    prev_mask:
        Weights it removed stay removed.
    """
    magnitude: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for n, w in weights.items():
        mag = w.detach().abs().reshape(-1).to(device="cpu", dtype=torch.float64)
        if prev_mask is not None:
            mag = torch.where(prev_mask[n].reshape(-1).cpu(), mag, torch.full_like(mag, -math.inf))
        magnitude[n] = mag
        masks[n] = topk_mask(mag, kept[n])
    deficit = budget - sum(int(m.sum()) for m in masks.values())
    if deficit > 0:
        candidates = {n: torch.where(masks[n], torch.full_like(mag, -math.inf), mag) for n, mag in magnitude.items()}
        extra = global_counts(candidates, deficit)
        for n, k in extra.items():
            if k:
                masks[n] |= topk_mask(candidates[n], k)
    return Mask({n: m.view(weights[n].shape) for n, m in masks.items()})
