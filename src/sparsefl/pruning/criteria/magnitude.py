"""Data-free weight criteria: random, magnitude (per layer), Global MP with MT, and LAMP."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsefl.config import opt
from sparsefl.pruning.allocation import lamp_scores
from sparsefl.pruning.base import (
    AllocationName,
    AllocationOptions,
    Criterion,
    PruneContext,
    register_criterion,
)
from sparsefl.rng import torch_gen

Tensor = torch.Tensor


@dataclass(frozen=True)
class LayerwiseOptions(AllocationOptions):
    """Allocation options with the per-layer (uniform) rule as default."""

    allocation: AllocationName = opt("layerwise", "how scores become a mask: layerwise (default), global, erk, lamp")


@register_criterion("random")
class RandomCriterion(Criterion):
    """Random pruning: i.i.d. uniform scores, each layer pruned to the same sparsity.

    The baseline of every pruning-at-initialisation paper. Scores are ``U(0, 1)`` drawn from a
    generator derived from ``(seed, "random", name)``, so they do not depend on the scope's order.
    Default allocation ``layerwise`` (uniform random pruning, exact per layer); Synaptic-Flow's
    ``Rand`` uses a global threshold instead (``allocation="global"``, equal in expectation), and
    ``allocation="erk"`` gives the random-ERK baseline of RigL.
    """

    Options = LayerwiseOptions
    per_layer = True

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        weights = ctx.weights()
        return {
            n: torch.rand(w.shape, generator=torch_gen(ctx.seed, "random", n), dtype=torch.float64)
            for n, w in weights.items()
        }


@register_criterion("magnitude")
class MagnitudeCriterion(Criterion):
    """Layer-wise magnitude pruning: |w|, each layer pruned to the same sparsity.

    Han et al. (2015) style uniform magnitude pruning: within every layer the smallest ``|w|``
    are removed, and every layer keeps exactly ``n_l - floor(s * n_l)`` weights. Ties go to the
    lower index. ``allocation="global"`` turns it into Global MP without the MT rule.
    """

    Options = LayerwiseOptions
    per_layer = True

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        return {n: w.abs() for n, w in ctx.weights().items()}


@dataclass(frozen=True)
class GlobalMagnitudeOptions(AllocationOptions):
    """Global MP: global allocation with Gupta et al.'s default minimum threshold (0.05 %)."""

    min_keep_fraction: float = opt(
        0.0005,
        "MT rule: every layer keeps at least this fraction of ALL scope weights (Gupta et al.: 0.05%)",
        ge=0,
        lt=1,
    )


@register_criterion("global_magnitude")
class GlobalMagnitudeCriterion(Criterion):
    """Global MP (Gupta et al. 2022): one exact global |w| threshold with a minimum per layer.

    "Is Complexity Required for Neural Network Pruning? A Case Study on Global Magnitude Pruning"
    (arXiv 2209.14624; code manasgupta-1/GlobalMP). The threshold is the exact k-th value of
    ``|w|`` over all scope weights with ``k = floor(s * N)`` removed; ties at the threshold go to
    the lower (layer, index) position so the kept count is exact (the reference computes it over
    ``N + 1`` values, one of them an uninitialised tensor; we do not copy that quirk).

    Minimum threshold (MT): every layer keeps at least ``max(min_keep, floor(min_keep_fraction *
    N))`` weights; the default fraction 0.0005 is the reference's ``--min-threshold 0.05`` (percent
    of all prunable weights), and a layer smaller than that stays dense. Where the reference
    rescales the other layers' sparsities iteratively, :func:`~sparsefl.pruning.allocation.
    global_counts` pins the short layers and recomputes the exact threshold over the rest, so the
    global target is met exactly. ``min_keep_fraction=0, min_keep=0`` is vanilla Global MP.

    Gradual Global MP: call :func:`~sparsefl.pruning.prune` at each pruning round with the target
    from :func:`~sparsefl.pruning.schedules.gradual_sparsity` and ``prev_mask`` = the last mask
    (monotone masks); fine-tuning in between is the caller's training loop.
    """

    Options = GlobalMagnitudeOptions

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        return {n: w.abs() for n, w in ctx.weights().items()}


@register_criterion("lamp")
class LampCriterion(Criterion):
    """LAMP (Lee et al., ICLR 2021): layer-adaptive magnitude scores, one global threshold.

    "Layer-adaptive sparsity for the magnitude-based pruning" (code jaeho-lee/layer-adaptive-
    sparsity). Within each layer, with weights in ascending order of magnitude, the score of
    weight ``u`` is ``w_u**2 / sum_{v >= u} w_v**2``; the largest weight of every layer scores 1,
    so no layer is emptied. The mask is the global top-k of these scores (``allocation``
    default ``global``; the MT options apply but are rarely needed). Ties in magnitude are
    ordered by index (stable sort).
    """

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        return lamp_scores({n: w.double() ** 2 for n, w in ctx.weights().items()})
