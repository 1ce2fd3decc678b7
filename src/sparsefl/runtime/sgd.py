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

``step(rows)`` restricts the update of a parameter to the rows (indices along dim 0) given for
it: the other rows, and their momentum, stay exactly as they are (FedSkel's frozen filters).
A row's momentum is therefore stale if that row is later updated again by the same optimiser
(FedSkel never does: a skeleton, once chosen, stays for the round's optimiser). Restricting
the update spares a pass over every weight per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
    def step(
        self,
        rows: Mapping[torch.Tensor, torch.Tensor] | None = None,
        row_grads: Mapping[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """One update of every parameter with a gradient; ``rows`` maps a parameter to the
        int64 indices of the only rows (dim 0) that may change (see the module docstring).

        ``row_grads`` maps a parameter in ``rows`` to the gradient of those rows alone (in the
        order of its indices), for gradients computed row-compact (FedSkel's skeleton kernels):
        it is added to ``p.grad``'s rows, or stands alone when ``p.grad`` is None."""
        for i, p in enumerate(self.params):
            g = p.grad
            compact = row_grads.get(p) if row_grads else None
            if g is None and compact is None:
                continue
            idx = rows.get(p) if rows else None
            if compact is not None:
                if idx is None:
                    raise ValueError("SGD.step: a row gradient for a parameter without rows")
                self._step_rows(i, p, compact if g is None else g.index_select(0, idx) + compact, idx)
                continue
            if idx is not None:
                self._step_rows(i, p, g.index_select(0, idx), idx)
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

    def _step_rows(self, i: int, p: torch.Tensor, gs: torch.Tensor, idx: torch.Tensor) -> None:
        """The same update on the rows ``idx`` of ``p`` only, on gathered copies (``gs``: the
        gradient of those rows)."""
        ps = p.index_select(0, idx)
        if self.weight_decay != 0:
            gs = gs.add(ps, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = self._buf[i]
            if buf is None:
                # rows never updated hold 0, and momentum * 0 + g == g: the first-step rule
                buf = self._buf[i] = torch.zeros_like(p)
                bs = gs.clone()
            else:
                bs = buf.index_select(0, idx).mul_(self.momentum).add_(gs)
            buf.index_copy_(0, idx, bs)
            gs = bs
        p.index_copy_(0, idx, ps.add_(gs, alpha=-self.lr))


__all__ = ["SGD"]
