"""ProsPr: prospect pruning with meta-gradients through the first steps of training
(Alizadeh et al., ICLR 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import functional_call

from sparsefl.config import opt
from sparsefl.pruning.base import (
    AllocationOptions,
    Batch,
    Criterion,
    PruneContext,
    register_criterion,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class ProsprOptions(AllocationOptions):
    """ProsPr options (defaults: the reference CLI, mil-ad/prospr ``cli.py``)."""

    inner_steps: int = opt(3, "differentiable SGD steps M before the meta-loss (0 = SNIP)", ge=0)
    inner_lr: float = opt(0.1, "learning rate of the inner SGD steps", gt=0)
    inner_momentum: float = opt(0.0, "momentum of the inner SGD steps", ge=0, lt=1)
    mode: Literal["full", "first_order"] = opt(
        "full", "full: backprop through the steps; first_order: treat d theta_M / d theta_0 as I"
    )
    new_data_in_inner: bool = opt(False, "inner step k uses batch k (cycling) instead of all batches")
    train_mode: bool = opt(True, "run the network in train mode (BatchNorm batch statistics)")


@register_criterion("prospr")
class ProsprCriterion(Criterion):
    """ProsPr (Alizadeh et al., ICLR 2022): meta-gradient of the loss after M SGD steps, global.

    "Prospect Pruning: Finding Trainable Weights at Initialization using Meta-Gradients" (code
    mil-ad/prospr). Multiplicative masks ``c = 1`` are put on the scope weights,
    ``theta'_0 = c * theta_0``; ``M`` differentiable SGD steps (momentum ``mu``, learning rate
    ``alpha``) give ``theta'_M``; the score is ``|dL(theta'_M) / dc|`` at ``c = 1``, i.e.
    ``theta_0 * [prod_k (I - alpha H_k)]^T grad L(theta'_M)``. Parameters outside the scope
    (biases, BatchNorm) take part in the inner steps but are not masked. Everything runs through
    :func:`torch.func.functional_call` on a copy, so no module is changed.

    Modes: ``full`` (default) builds the graph through every step (``create_graph=True``; Hessian-
    vector products). ``first_order`` detaches the inner gradients, so ``d theta'_M / d theta'_0 =
    I`` and the score is ``|grad L(theta'_M) * theta_0|``. With ``inner_steps=0`` both equal SNIP.

    Data: by default (``new_data_in_inner=False``, the reference CLI's default) every inner step
    and the meta-loss use the mean loss over all given batches. With ``new_data_in_inner=True``
    inner step ``k`` uses batch ``k mod B`` and the meta-loss batch ``M mod B`` (the reference
    library function's default draws fresh batches; the exact pairing is our choice).

    Defaults (reference CLI): ``M = 3``, inner lr 0.1, inner momentum 0, ``full``. Departures:
    the reference README example uses lr 0.5 and momentum 0.9; scores are not normalised;
    ``min_keep=1`` (no layer emptied; the reference asserts this instead).
    """

    Options = ProsprOptions
    needs_data = True

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        o = self.options
        batches = ctx.require_data()
        net = ctx.working_copy(train=o.train_mode)
        ctx.scope_params(net)  # every scope name must be a parameter
        base = {n: p.detach() for n, p in net.named_parameters()}
        masks = {n: torch.ones_like(base[n], requires_grad=True) for n in ctx.scope}
        theta: dict[str, Tensor] = {
            n: (masks[n] * p if n in masks else p.clone().requires_grad_(True)) for n, p in base.items()
        }

        def loss_on(params: dict[str, Tensor], chosen: list[Batch]) -> Tensor:
            losses = [ctx.loss_fn(functional_call(net, params, (x,)), y) / len(chosen) for x, y in chosen]
            return torch.stack(losses).sum()

        def batches_for(step: int) -> list[Batch]:
            return [batches[step % len(batches)]] if o.new_data_in_inner else batches

        full = o.mode == "full"
        velocity = {n: torch.zeros_like(p) for n, p in base.items()}
        for k in range(o.inner_steps):
            loss = loss_on(theta, batches_for(k))
            names = list(theta)
            grads = torch.autograd.grad(loss, [theta[n] for n in names], create_graph=full, allow_unused=True)
            new: dict[str, Tensor] = {}
            for n, g in zip(names, grads):
                if g is None:
                    g = torch.zeros_like(base[n])
                elif not full:
                    g = g.detach()
                velocity[n] = o.inner_momentum * velocity[n] + g
                new[n] = theta[n] - o.inner_lr * velocity[n]
            theta = new

        meta_batches = batches_for(o.inner_steps)
        mlist = list(masks.values())
        total = [torch.zeros_like(m) for m in mlist]
        for x, y in meta_batches:
            meta = ctx.loss_fn(functional_call(net, theta, (x,)), y) / len(meta_batches)
            grads = torch.autograd.grad(meta, mlist, retain_graph=True, allow_unused=True)
            for acc, g in zip(total, grads):
                if g is not None:
                    acc += g
        return {n: t.abs() for n, t in zip(masks, total)}
