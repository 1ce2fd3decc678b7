"""Masked local training with the fastest correct kernel per layer (unstructured masks).

:class:`CsrLinears` puts :class:`~sparsefl.kernels.sparse_linear.CsrLinearFn` on the masked
``nn.Linear`` layers where it wins: their kept values become the trained tensors (a fresh
``nn.Parameter`` per layer, which the optimiser gets in place of the dense weight), the layer's
``forward`` is replaced on the instance, and :meth:`CsrLinears.close` writes the values back
into the dense weight (zeros elsewhere) and restores the forwards. SGD with momentum and weight
decay is elementwise, so training the kept values is the same update as training the dense
weight with masked gradients and re-applied mask (the masked entries stay exactly 0 there).

Convolutions always stay dense (masked dense): unfold + CSR runs ResNet-18's layers at
0.15-0.48x dense on a 2-vCPU x86 CPU (2.05x only at 99% sparsity on 512ch@4x4), and PyTorch has
no direct sparse convolution on CPU, so no sparse conv kernel is offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefl.kernels.choice import cached, choose, density_bucket
from sparsefl.kernels.sparse_linear import CsrPattern, csr_linear
from sparsefl.patching import ForwardPatches

Tensor = torch.Tensor
KernelMode = Literal["dense", "auto", "csr"]

#: below this sparsity a CSR linear never wins (its break-even is about 80% sparsity on a
#: 2-vCPU x86 CPU); the measurement is skipped there to keep the start of training cheap
MIN_SPARSITY_TO_TRY = 0.7


def _bench_linear(out_f: int, in_f: int, batch: int, density: float) -> dict[str, Any]:
    """Step callables (forward + backward + the masked update's extra passes) on random data."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(out_f, in_f, generator=g) < density
    w = nn.Parameter(torch.randn(out_f, in_f, generator=g) * mask)
    fmask = mask.float()
    x = torch.randn(batch, in_f, generator=g)
    pat = CsrPattern.from_mask(mask)
    vals = nn.Parameter(pat.gather(w))

    def dense() -> None:
        w.grad = None
        F.linear(x, w).sum().backward()
        with torch.no_grad():
            w.grad.mul_(fmask)  # type: ignore[union-attr]
            w.mul_(fmask)

    def csr() -> None:
        vals.grad = None
        csr_linear(x, vals, None, pat).sum().backward()

    return {"dense": dense, "csr": csr}


def linear_kernel(out_f: int, in_f: int, batch: int, density: float, mode: KernelMode = "auto") -> str:
    """``"dense"`` or ``"csr"`` for a masked linear layer of this shape, batch and density.

    ``mode="auto"`` measures (cached per shape, batch and 5%-density bucket, for the process);
    densities above ``1 - MIN_SPARSITY_TO_TRY`` are dense without measuring.
    """
    if mode != "auto":
        return mode
    bucket = density_bucket(density)
    if 1.0 - bucket < MIN_SPARSITY_TO_TRY:
        return "dense"
    key = ("linear", out_f, in_f, batch, bucket)
    hit = cached(key)
    if hit is not None:
        return hit
    with torch.enable_grad():
        return choose(key, _bench_linear(out_f, in_f, batch, max(bucket, 1e-3)))


class CsrLinears:
    """CSR kernels on the masked linear layers of one local training (see the module docstring).

    Parameters
    ----------
    model:
        The client's model.
    mask:
        Weight name -> bool mask (the static mask).
    mode:
        ``dense`` (install nothing), ``csr`` (every masked 2-D linear weight) or ``auto`` (where
        :func:`linear_kernel` measures a win).
    batch:
        The local batch size (part of the measured shape).
    """

    def __init__(self, model: nn.Module, mask: Mapping[str, Tensor], mode: KernelMode, batch: int) -> None:
        self.model = model
        self.layers: dict[str, tuple[nn.Linear, CsrPattern, nn.Parameter]] = {}
        self._patches = ForwardPatches()
        if mode == "dense":
            return
        mods = dict(model.named_modules())
        for name, m in mask.items():
            mod = mods.get(name[: -len(".weight")]) if name.endswith(".weight") else None
            if not isinstance(mod, nn.Linear) or mod.weight.dtype != torch.float32:
                continue
            kept = m.to(torch.bool)
            if linear_kernel(mod.out_features, mod.in_features, batch, float(kept.float().mean()), mode) != "csr":
                continue
            pat = CsrPattern.from_mask(kept)
            vals = nn.Parameter(pat.gather(mod.weight), requires_grad=mod.weight.requires_grad)
            self.layers[name] = (mod, pat, vals)
            self._install(mod, pat, vals)

    def _install(self, mod: nn.Linear, pat: CsrPattern, vals: nn.Parameter) -> None:
        def forward(x: Tensor) -> Tensor:
            return csr_linear(x, vals, mod.bias, pat)

        self._patches.replace(mod, forward)

    def substitute(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """``params`` with each CSR layer's dense weight replaced by its values parameter."""
        swap = {id(mod.weight): vals for mod, _, vals in self.layers.values()}
        return [swap.get(id(p), p) for p in params]

    def sync(self) -> None:
        """Write the trained values into the dense weights (zeros at masked entries)."""
        with torch.no_grad():
            for mod, pat, vals in self.layers.values():
                pat.scatter(vals, mod.weight)

    def close(self) -> None:
        """:meth:`sync`, then restore every replaced ``forward``."""
        self.sync()
        self._patches.restore()


__all__ = ["MIN_SPARSITY_TO_TRY", "CsrLinears", "KernelMode", "linear_kernel"]
