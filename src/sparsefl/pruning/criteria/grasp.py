"""GraSP: gradient signal preservation, Hessian-gradient product scores (Wang et al., ICLR 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsefl.config import opt
from sparsefl.pruning.base import AllocationOptions, Criterion, PruneContext, register_criterion

Tensor = torch.Tensor


@dataclass(frozen=True)
class GraspOptions(AllocationOptions):
    """GraSP options."""

    temperature: float = opt(200.0, "logits are divided by this before the loss (Synaptic-Flow port: 200)", gt=0)
    eps: float = opt(1e-10, "added to |sum of scores| before normalising", gt=0)
    train_mode: bool = opt(True, "score with the network in train mode (BatchNorm batch statistics)")


@register_criterion("grasp")
class GraspCriterion(Criterion):
    """GraSP (Wang, Zhang & Grosse, ICLR 2020): keep the gradient flow, score theta * Hg, global.

    "Picking Winning Tickets Before Training by Preserving Gradient Flow". With ``g`` the
    gradient of the loss of the temperature-scaled logits (``f(x) / T``, ``T = 200`` as in the
    Synaptic-Flow port of alecwangcq/GraSP), and ``H`` its Hessian, ``Hg`` is computed by double
    backprop: the stopped gradient ``g`` (summed over batches) is dotted with the gradient built
    with ``create_graph=True``, and that product is differentiated again, per batch.

    Sign convention: the paper's score is ``S = -theta * Hg`` and it removes the weights with the
    *largest* ``S`` (removing them reduces gradient flow least). sparsefl's scores mean "higher =
    more important", so GraSP's score here is ``-S = theta * Hg`` (signed, not an absolute
    value), normalised by ``|sum(theta * Hg)| + eps`` as in the Synaptic-Flow port; keeping the
    top-k of it is exactly the paper's mask. Because scores are signed, ``allocation="lamp"``
    does not apply.

    Departures: the reference draws a class-balanced batch (10 samples per class) and
    re-initialises; here the given batches are used as they are. ``train_mode=True`` (default)
    uses BatchNorm batch statistics; Synaptic-Flow scores in eval mode (``train_mode=False``).
    ``min_keep=1`` by default (no layer emptied).
    """

    Options = GraspOptions
    needs_data = True

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        o = self.options
        batches = ctx.require_data()
        net = ctx.working_copy(train=o.train_mode)
        params = ctx.scope_params(net)
        plist = list(params.values())

        def loss(batch: tuple[Tensor, Tensor]) -> Tensor:
            x, y = batch
            return ctx.loss_fn(net(x) / o.temperature, y)

        # g: first gradient, no graph (summed over batches, as the reference does)
        stopped = [torch.zeros_like(p) for p in plist]
        for batch in batches:
            grads = torch.autograd.grad(loss(batch), plist, allow_unused=True)
            for acc, g in zip(stopped, grads):
                if g is not None:
                    acc += g
        # Hg = d(g_stopped . g(theta)) / d theta, one double backward per batch
        hg = [torch.zeros_like(p) for p in plist]
        for batch in batches:
            grads = torch.autograd.grad(loss(batch), plist, create_graph=True, allow_unused=True)
            dot = sum(
                ((gs * g).sum() for gs, g in zip(stopped, grads) if g is not None),
                torch.zeros((), device=plist[0].device),
            )
            if not dot.requires_grad:
                continue
            second = torch.autograd.grad(dot, plist, allow_unused=True)
            for acc, h in zip(hg, second):
                if h is not None:
                    acc += h
        scores = {n: (p.detach() * h).detach() for (n, p), h in zip(params.items(), hg)}
        norm = torch.cat([s.reshape(-1) for s in scores.values()]).sum().abs() + o.eps
        return {n: s / norm for n, s in scores.items()}
