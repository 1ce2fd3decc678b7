"""Skeletonization: remove the least relevant whole units (Mozer & Smolensky, NIPS 1988).

"Skeletonization: A Technique for Trimming the Fat from a Network via Relevance Assessment"
(Advances in NIPS 1, 1989). Every unit (here: every output channel of a scope Conv/Linear layer)
gets an attention strength ``alpha_i`` (nominally 1) that multiplies its output; the relevance
``rho_i = E(alpha_i = 0) - E(alpha_i = 1)`` is estimated to first order by
``-dE/d alpha_i`` at ``alpha = 1``, and the least relevant units are removed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefl.config import opt
from sparsefl.errors import ConfigError
from sparsefl.masks import Mask
from sparsefl.pruning.allocation import num_kept
from sparsefl.pruning.base import (
    Criterion,
    LossFn,
    PruneContext,
    ScopeOptions,
    register_criterion,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class SkeletonizationOptions(ScopeOptions):
    """Skeletonization options."""

    error: Literal["linear", "ce"] = opt(
        "linear", "error for relevance: linear sum|t - softmax(o)| (the paper) or ce (cross-entropy)"
    )
    absolute: bool = opt(False, "rank channels by |relevance| instead of the signed relevance")
    min_channels: int = opt(1, "output channels every layer keeps at least", ge=1)
    train_mode: bool = opt(False, "run in train mode (BatchNorm batch statistics make pre-BN gates scale-invariant)")


@dataclass(frozen=True)
class Skeleton:
    """The result of :func:`sparsefl.pruning.skeletonize`.

    Attributes
    ----------
    mask:
        Structured mask: whole rows (output channels, dim 0) of each weight are False.
    channel_mask:
        state_dict name -> bool vector over output channels (True = kept), for compaction.
    relevance:
        state_dict name -> relevance of each output channel (higher = more relevant).
    """

    mask: Mask
    channel_mask: dict[str, Tensor]
    relevance: dict[str, Tensor]


def channel_mask(mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-tensor bool vector of the output channels (dim 0) a mask keeps any weight of.

    For a structured mask (whole rows removed) this is exactly its channel selection; a later
    "compact the network" step can drop the False channels of the layer, its bias and the
    BatchNorm that follows it, and the matching input channels of the next layer.
    """
    return {n: m.reshape(m.shape[0], -1).any(dim=1) if m.dim() else m.reshape(1) for n, m in mask.items()}


def _module_of(net: nn.Module, name: str, criterion: str) -> nn.Module:
    modules = dict(net.named_modules())
    mod_name, _, leaf = name.rpartition(".")
    mod = modules.get(mod_name)
    if leaf != "weight" or mod is None or getattr(mod, "weight", None) is None:
        raise ConfigError("scope", name, f"weights of Conv/Linear modules ('{criterion}' gates their outputs)")
    return mod


def linear_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mozer & Smolensky's linear error ``sum_classes |t - softmax(o)|``, averaged over samples
    (``t`` one-hot). Unlike the quadratic error its gradient does not vanish near convergence."""
    probs = F.softmax(outputs.flatten(1), dim=1)
    onehot = F.one_hot(targets.long(), probs.shape[1]).to(probs.dtype)
    return (onehot - probs).abs().sum(dim=1).mean()


def _relevance(ctx: PruneContext, o: SkeletonizationOptions) -> dict[str, Tensor]:
    batches = ctx.require_data()
    net = ctx.working_copy(train=o.train_mode)
    for p in net.parameters():
        p.requires_grad_(False)
    error: LossFn = (
        ctx.loss_fn
        if ctx.loss_given
        else (linear_error if o.error == "linear" else (lambda out, y: F.cross_entropy(out, y)))
    )
    state = net.state_dict(keep_vars=True)
    gates: dict[str, Tensor] = {}
    handles = []
    for n in ctx.scope:
        mod = _module_of(net, n, ctx.criterion)
        channels = state[n].shape[0]
        gate = torch.ones(channels, device=state[n].device, dtype=state[n].dtype, requires_grad=True)
        gates[n] = gate

        def hook(_m: nn.Module, _inp: Any, out: Tensor, gate: Tensor = gate) -> Tensor:
            # Linear: channels on the last dim; Conv: on dim 1
            if isinstance(_m, nn.Linear):
                return out * gate
            return out * gate.view(1, -1, *([1] * (out.dim() - 2)))

        handles.append(mod.register_forward_hook(hook))
    try:
        glist = list(gates.values())
        total = [torch.zeros_like(g) for g in glist]
        for x, y in batches:
            e = error(net(x), y) / len(batches)
            grads = torch.autograd.grad(e, glist, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g
    finally:  # the copy is discarded anyway; removing the hooks keeps the copy honest
        for h in handles:
            h.remove()
    rel = {n: (-t).detach().cpu() for n, t in zip(gates, total)}
    if o.absolute:
        rel = {n: r.abs() for n, r in rel.items()}
    return rel


def _select(
    relevance: Mapping[str, Tensor], shapes: Mapping[str, torch.Size], sparsity: float, min_channels: int
) -> dict[str, Tensor]:
    """Channels to keep: remove the least relevant until the removed weights are as close to
    ``floor(s * N)`` as whole channels allow, never below ``min_channels`` per layer."""
    total = sum(math.prod(s) for s in shapes.values())
    target = total - num_kept(total, sparsity)
    entries = []
    for li, (n, r) in enumerate(relevance.items()):
        row = math.prod(shapes[n][1:])
        for c, v in enumerate(r.tolist()):
            v = v if math.isfinite(v) else -math.inf
            entries.append((v, li, c, n, row))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    keep = {n: torch.ones(shapes[n][0], dtype=torch.bool) for n in relevance}
    left = {n: int(shapes[n][0]) for n in relevance}
    removed = 0
    for _v, _li, c, n, row in entries:
        if removed >= target:
            break
        if left[n] <= min_channels:
            continue
        # remove when it fits, or when overshooting lands nearer the target than stopping short
        if removed + row <= target or (removed + row - target) < (target - removed):
            keep[n][c] = False
            left[n] -= 1
            removed += row
    return keep


def skeleton(ctx: PruneContext, options: SkeletonizationOptions, sparsity: float) -> Skeleton:
    """Relevance, channel selection and the structured mask (see :class:`SkeletonizationCriterion`;
    the public entry point is :func:`sparsefl.pruning.skeletonize`)."""
    rel = _relevance(ctx, options)
    shapes = {n: ctx.model.state_dict()[n].shape for n in ctx.scope}
    keep = _select(rel, shapes, sparsity, options.min_channels)
    mask = Mask({n: keep[n].view(-1, *([1] * (len(shapes[n]) - 1))).expand(shapes[n]) for n in ctx.scope})
    return Skeleton(mask=mask, channel_mask=keep, relevance=rel)


@register_criterion("skeletonization")
class SkeletonizationCriterion(Criterion):
    """Skeletonization (Mozer & Smolensky 1989): remove the least relevant whole output channels.

    Relevance of output channel ``i`` of a scope layer: ``rho_i = -dE/d alpha_i`` at ``alpha = 1``,
    with a multiplier ``alpha`` on each output channel applied by temporary forward hooks on a
    copy of the network; ``E`` is the paper's linear error ``sum |t - softmax(o)|`` (mean over
    samples; ``error="ce"`` for cross-entropy; a user ``loss_fn`` replaces it), averaged over the
    given batches. Channels are removed in ascending relevance (ties by layer, then channel), as
    long as each removal brings the number of removed weights closer to ``floor(s * N)``: the
    result is within half a channel's weights of the target whenever channels are left to remove,
    and always within one channel's. No layer goes below ``min_channels`` (default 1).

    Choices and departures:

    * The paper removes one unit and retrains, repeatedly; here all channels are removed in one
      shot, and its 0.8/0.2 running average of relevance over training time (a recalled
      constant) is replaced by averaging over the given batches. Retraining is the caller's.
    * Units are the outputs of the scope's Conv/Linear layers (before BatchNorm), so gating
      ``alpha_i = 0`` is exactly what zeroing row ``i`` of the weight does. The default runs in
      eval mode: in train mode BatchNorm would cancel a pre-BN scale and the derivative vanishes.
    * Relevance is signed (the paper's rho); ``absolute=True`` ranks by ``|rho|``.

    The mask only covers the scope weights: a removed channel's bias and the following
    BatchNorm's shift still act until the network is compacted; :func:`channel_mask` (or
    :func:`sparsefl.pruning.skeletonize`'s ``channel_mask``) gives the channel selection for that.
    """

    Options = SkeletonizationOptions
    needs_data = True
    structured = True

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        rel = _relevance(ctx, self.options)
        state = ctx.model.state_dict()
        return {n: r.view(-1, *([1] * (state[n].dim() - 1))).expand(state[n].shape).clone() for n, r in rel.items()}

    def prune(self, ctx: PruneContext, sparsity: float) -> Mask:
        return skeleton(ctx, self.options, sparsity).mask
