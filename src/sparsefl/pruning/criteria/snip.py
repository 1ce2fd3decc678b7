"""SNIP: connection sensitivity |g * w| on a batch (Lee, Ajanthan & Torr, ICLR 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsefl.config import opt
from sparsefl.pruning.base import AllocationOptions, Criterion, PruneContext, register_criterion

Tensor = torch.Tensor


@dataclass(frozen=True)
class SnipOptions(AllocationOptions):
    """SNIP options."""

    train_mode: bool = opt(True, "score with the network in train mode (BatchNorm batch statistics)")


def mean_batch_grads(
    ctx: PruneContext, net: torch.nn.Module, params: dict[str, torch.nn.Parameter]
) -> dict[str, Tensor]:
    """Gradient of the mean over batches of the per-batch loss, one backward pass per batch."""
    batches = ctx.require_data()
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in batches:
        loss = ctx.data_loss(net, batch) / len(batches)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                total[n] += g
    return total


@register_criterion("snip")
class SnipCriterion(Criterion):
    """SNIP (Lee et al., ICLR 2019): connection sensitivity |dL/dw * w| on a batch, global top-k.

    "SNIP: Single-shot Network Pruning based on Connection Sensitivity". The score of a weight is
    ``|g * w|`` with ``g`` the gradient of the loss (default cross-entropy) at the given weights;
    with several batches, ``g`` is the gradient of the mean of the per-batch losses. Kept: the
    global top-k (``allocation="global"``).

    Departures, each an option or documented choice:

    * The scores are not divided by their sum (the paper's normalisation does not change the
      ranking; federated averaging can normalise per client if it wants equal weights).
    * The network is scored as given; the reference port (mil-ad/snip) scores a copy
      re-initialised with Xavier-normal weights. Pass a re-initialised model for that.
    * ``train_mode=True`` (default): BatchNorm uses batch statistics, as in mil-ad/snip and
      ProsPr; Synaptic-Flow's port scores in eval mode (``train_mode=False``).
    * ``min_keep=1`` by default: no layer is emptied (set 0 for the unguarded original).
    """

    Options = SnipOptions
    needs_data = True

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        net = ctx.working_copy(train=self.options.train_mode)
        params = ctx.scope_params(net)
        grads = mean_batch_grads(ctx, net, params)
        return {n: (grads[n] * p.detach()).abs() for n, p in params.items()}
