"""SGD with momentum and weight decay: the optimiser of the one local training loop.

The same update as ``torch.optim.SGD`` (no dampening, no Nesterov) on CPU, operation for
operation, so the numbers are identical (a test checks it bit for bit). It exists because
constructing ``torch.optim.SGD`` imports ``torch._dynamo`` (its methods are wrapped to disable
the compiler), which took 1.5-3.5 s per process here: longer than a whole default round, paid by
the main process and again by every worker process of ``--jobs``.

Per parameter ``p`` with gradient ``g``::

    g = g + weight_decay * p          (when weight_decay != 0)
    buf = g  (first step)  |  buf = momentum * buf + g
    p = p - lr * buf                  (buf = g when momentum == 0)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class SGD:
    """Minimal SGD (see the module docstring); ``zero_grad`` and ``step`` as in ``torch.optim``."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(
                f"SGD: lr={lr} must be > 0, momentum={momentum} in [0, 1), weight_decay={weight_decay} >= 0"
            )
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._buf: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self._buf[i]
                if buf is None:
                    buf = self._buf[i] = torch.clone(g).detach()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


__all__ = ["SGD"]
