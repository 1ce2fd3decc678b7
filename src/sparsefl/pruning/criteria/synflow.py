"""SynFlow: data-free iterative synaptic-flow pruning (Tanaka et al., NeurIPS 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sparsefl.config import opt
from sparsefl.masks import Mask
from sparsefl.pruning.allocation import allocate
from sparsefl.pruning.base import (
    AllocationOptions,
    Criterion,
    PruneContext,
    allocation_kwargs,
    register_criterion,
)
from sparsefl.pruning.schedules import exponential_densities

Tensor = torch.Tensor


@dataclass(frozen=True)
class SynflowOptions(AllocationOptions):
    """SynFlow options."""

    iterations: int = opt(100, "pruning iterations n (exponential schedule rho**(j/n))", ge=1)
    input_shape: tuple[int, ...] | None = opt(None, "shape of one input sample (default: from data)")
    precision: Literal["float64", "float32"] = opt(
        "float64", "dtype of the synaptic-flow pass (float64 keeps deep nets from overflowing)"
    )


@register_criterion("synflow")
class SynflowCriterion(Criterion):
    """SynFlow (Tanaka et al., NeurIPS 2020): data-free, iterative conservation of synaptic flow.

    "Pruning neural networks without any data by iteratively conserving synaptic flow" (code
    ganguli-lab/Synaptic-Flow, ``Pruners/pruners.py``). On a copy of the network with every
    floating-point parameter *and buffer* replaced by its absolute value, feed one all-ones input
    ``1`` of the data's shape, let ``R = sum(f(1))`` and score each scope weight by
    ``|theta * dR/dtheta|``. Repeat for ``j = 1..n`` (``n = iterations``, default 100 as the
    reference's ``--prune-epochs``), pruning to density ``rho ** (j / n)`` (``rho`` = final
    density) with the global rule; weights removed in earlier iterations stay removed (zeroed in
    the pass and excluded from later allocations).

    Choices and departures:

    * BatchNorm: the pass runs in eval mode with the absolute running statistics, as in the
      reference (whose ``prune_loop`` defaults to eval mode and whose ``linearize`` takes the
      absolute value of the whole ``state_dict``). Train mode is not offered: it would normalise
      away the flow and fails on a 1x1 feature map with one sample.
    * ``precision="float64"`` by default: the flow is a product over layers and overflows or
      underflows float32 in deep nets (Synaptic-Flow#12); the reference has ``model.double()``
      commented out.
    * ``min_keep=1`` by default (MT rule available via ``min_keep_fraction``): single-shot
      SynFlow can empty ResNet shortcut convolutions (Synaptic-Flow#7); no layer is emptied here.
    * The input shape comes from ``input_shape`` or, if not given, from ``data`` (only its shape
      is used).

    :meth:`score` (one-shot) is one pass at full density.
    """

    Options = SynflowOptions

    def _net(self, ctx: PruneContext) -> tuple[nn.Module, dict[str, nn.Parameter], Tensor]:
        dtype = torch.float64 if self.options.precision == "float64" else torch.float32
        net = ctx.working_copy(train=False, dtype=dtype)
        with torch.no_grad():
            for t in net.state_dict().values():
                if t.is_floating_point():
                    t.abs_()
        params = ctx.scope_params(net)
        shape = ctx.input_shape(self.options.input_shape)
        ones = torch.ones((1, *shape), dtype=dtype, device=ctx.device)
        return net, params, ones

    @staticmethod
    def _flow(net: nn.Module, params: dict[str, nn.Parameter], ones: Tensor) -> dict[str, Tensor]:
        out = net(ones)
        grads = torch.autograd.grad(out.sum(), list(params.values()), allow_unused=True)
        return {
            n: (p.detach() * (g if g is not None else torch.zeros_like(p))).abs()
            for (n, p), g in zip(params.items(), grads)
        }

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        net, params, ones = self._net(ctx)
        return self._flow(net, params, ones)

    def prune(self, ctx: PruneContext, sparsity: float) -> Mask:
        net, params, ones = self._net(ctx)
        kwargs = allocation_kwargs(self.options)
        mask: Mask | None = kwargs.pop("prev_mask")
        if mask is not None:
            mask = Mask({n: mask[n] for n in ctx.scope})
        start = 1.0 if mask is None else mask.num_kept() / mask.numel()
        final = 1.0 - sparsity
        abs_weights = {n: p.detach().clone() for n, p in params.items()}
        schedule = exponential_densities(final, self.options.iterations, max(start, final))
        for j, density in enumerate(schedule):
            if mask is not None:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(abs_weights[n] * mask[n].to(device=p.device, dtype=p.dtype))
            scores = self._flow(net, params, ones)
            target = sparsity if j == len(schedule) - 1 else 1.0 - density
            if mask is not None:  # rounding must not ask for more than the survivors
                kept = sum(int(torch.count_nonzero(m)) for m in mask.values())
                target = max(target, 1.0 - kept / mask.numel())
            mask = allocate(scores, min(max(target, 0.0), sparsity), prev_mask=mask, **kwargs)
        assert mask is not None
        return mask
