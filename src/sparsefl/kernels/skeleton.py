"""FedSkel's skeleton-only backward as compact kernels (Luo et al., CIKM 2021).

The reference implementation (:class:`sparsefl.methods.fedskel.SkeletonHooks` with
``method.backward=mask``) zeroes the output gradient ``dL/dY`` of every non-skeleton channel with
a tensor hook and lets the dense conv backward run on it: correct, but exactly as slow as dense
backprop. Here the same products run on gathered tensors only, which at ``r = 0.1`` makes the
conv backward of ResNet-18's 128-512-channel layers 5.8-6.3x faster than dense on a 2-vCPU x86
CPU (the paper reports up to 5.52x):

``gY_s = dL/dY[:, idx]``, ``W_s = W[idx]``;
``dL/dX = conv_input_grad(gY_s, W_s)`` (a conv backward with ``r * C_out`` output channels);
``dL/dW[idx] = conv_weight_grad(X, gY_s)``, every other row 0; ``dL/db[idx] = sum gY_s``.

Since ``dL/dY`` is zero outside ``idx`` in the reference, both products are mathematically equal
to the reference's; only the floating-point summation order of ``dL/dX`` differs (a sum over
fewer terms, the zeros left out). The forward stays dense, as in FedSkel.

:func:`skeleton_batch_norm` does the same for the BatchNorm that follows a skeleton conv when
only the skeleton channels' input gradient is needed (``bn="train"``: the conv masks what the
BatchNorm passes down anyway): the affine-parameter gradients are computed for every channel
(they train densely in the reference) and the input gradient only for the skeleton channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sparsefl.patching import ForwardPatches

Tensor = torch.Tensor


#: the compact backward pads the skeleton to a multiple of this many channels (with zero filters):
#: oneDNN runs aligned channel counts faster; 26 -> 32 channels halves a 256-channel layer's
#: backward in fp32, and bf16 kernels gain 25-40% at every width (benchmarks/speed.py times the
#: whole step)
CHANNEL_ALIGN = 16


def padded_size(k: int, channels: int) -> int:
    """The channel count the compact backward runs at for a skeleton of ``k`` of ``channels``."""
    return min(-(-k // CHANNEL_ALIGN) * CHANNEL_ALIGN, channels)


def compact_pays(k: int, channels: int) -> bool:
    """Whether the compact backward can beat the dense one: its padded skeleton is at most half
    the layer. A 16-channel layer at ratio 0.1 pads to all 16 channels, and gathering then costs
    more than it saves (resnet20's first stage); such layers run the dense backward with the
    filters outside the skeleton zeroed instead (:class:`SkeletonConvFn`)."""
    return 2 * padded_size(k, channels) <= channels


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the products run in: the CPU autocast dtype when autocast is on (the backward
    runs outside autocast, so the functions cast explicitly), else the input's."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _scattered(rows: Tensor, shape: Sequence[int], idx: Tensor, dim: int = 0) -> Tensor:
    """A tensor of ``shape`` whose slices ``idx`` along ``dim`` are ``rows``, zero elsewhere."""
    return torch.zeros(shape, dtype=rows.dtype, device=rows.device).index_copy_(dim, idx, rows)


def _weight_grad(ctx: Any, rows: Tensor, shape: torch.Size, idx: Tensor) -> Tensor | None:
    """The weight gradient whose rows ``idx`` are ``rows`` (zero elsewhere), or, with a sink,
    ``rows`` added to ``sink[weight]`` and no full gradient (None)."""
    if ctx.sink is None:
        return _scattered(rows, shape, idx)
    sink, weight = ctx.sink
    prev = sink.get(weight)
    sink[weight] = rows if prev is None else prev + rows  # a layer run twice: accumulate, as autograd would
    return None


class SkeletonConvFn(torch.autograd.Function):
    """Dense convolution forward; backward through the skeleton output channels ``idx`` only.

    ``forward(x, weight, bias, idx, stride, padding, dilation, groups, sink, handoff)`` returns
    ``conv(x, weight) + bias`` exactly as ``F.conv{1,2,3}d``; ``idx`` is a sorted int64 tensor of
    output channels. ``groups`` must be 1 (a grouped conv's input gradient would need the
    matching input-channel groups gathered too).

    When the padded skeleton is more than half the layer (:func:`compact_pays`), gathering costs
    more than it saves: the backward then runs the dense kernel on the whole ``dL/dY`` with the
    filters outside ``idx`` zeroed, which gives the same ``dL/dX`` (the other channels' terms
    are exact zeros either way) and takes the weight-gradient rows and bias sums at ``idx``.

    ``handoff`` is a dict shared with the :class:`SkeletonBatchNormFn` that consumes this output:
    that function leaves the skeleton channels' output gradient there (``handoff["gy"]``, shape
    ``(N, len(idx), ...)``) and passes no gradient through autograd; the backward adds it to the
    skeleton channels of whatever gradient other consumers of the output sent (None when none).

    With a ``sink`` (a dict), the weight's gradient is not returned as a full tensor that is
    zero outside the skeleton rows: its ``idx`` rows are added to ``sink[weight]`` instead, and
    the optimiser reads them there (:meth:`sparsefl.runtime.sgd.SGD.step`'s ``row_grads``). Filling
    and scattering the full zero gradients of resnet18's convs would cost about 19 ms a step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        idx: Tensor,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        sink: dict[Tensor, Tensor] | None = None,
        handoff: dict[str, Tensor] | None = None,
    ) -> Tensor:
        ctx.set_materialize_grads(False)  # no output gradient but the handoff's: None, not zeros
        dt = compute_dtype(x)
        xc, wc = x.to(dt), weight.to(dt)
        bc = None if bias is None else bias.to(dt)
        n = len(stride)
        y = torch.ops.aten.convolution(xc, wc, bc, list(stride), list(padding), list(dilation), False, [0] * n, groups)
        ctx.save_for_backward(xc, wc, idx)
        ctx.conf = (list(stride), list(padding), list(dilation), groups, x.dtype, weight.dtype, bias is not None)
        ctx.sink = (sink, weight) if sink is not None else None
        ctx.handoff = handoff
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xc, wc, idx = ctx.saved_tensors
        stride, padding, dilation, groups, x_dtype, w_dtype, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        handed = ctx.handoff.pop("gy", None) if ctx.handoff is not None else None
        if gy is None and handed is None:  # the output got no gradient at all
            return None, None, None, None, None, None, None, None, None, None
        k, c = len(idx), wc.shape[0]
        mask = [bool(need_x), bool(need_w), bool(need_b and has_bias)]
        geometry = (stride, padding, dilation, False, [0] * len(stride), groups)
        pad = 0
        if not compact_pays(k, c):
            # a skeleton too large to gather profitably: the dense kernel, with the filters
            # outside the skeleton zeroed. dL/dX then sums over the skeleton channels only, as in
            # the reference (which zeroes those channels of dL/dY instead: a pass over the whole
            # output gradient, not over the small weight), and the weight-gradient rows and bias
            # sums are taken at idx
            g = gy
            if handed is not None:  # (a handoff given with a skeleton this wide: scattered back)
                full = (handed.shape[0], c, *handed.shape[2:])
                g = _scattered(handed, full, idx, 1) if gy is None else gy.index_add(1, idx, handed.to(gy.dtype))
            wm = _scattered(wc.index_select(0, idx), wc.shape, idx)
            gx, gw_all, gb_all = torch.ops.aten.convolution_backward(
                g.to(wc.dtype), xc, wm, [c] if has_bias else None, *geometry, mask
            )
            gws = None if gw_all is None else gw_all.index_select(0, idx)
            gbs = None if gb_all is None else gb_all.index_select(0, idx)
        else:
            gys = handed if gy is None else gy.index_select(1, idx)
            if gy is not None and handed is not None:
                gys = gys + handed
            gys = gys.to(wc.dtype)
            ws = wc.index_select(0, idx)
            pad = padded_size(k, c) - k
            if pad > 0:
                # zero filters fed zero gradients: the input gradient is unchanged, and their weight
                # gradient rows are dropped below; oneDNN runs aligned channel counts much faster
                gys = torch.cat([gys, gys.new_zeros((gys.shape[0], pad, *gys.shape[2:]))], 1)
                ws = torch.cat([ws, ws.new_zeros((pad, *ws.shape[1:]))], 0)
            if xc.dim() == 4 and xc.is_contiguous(memory_format=torch.channels_last):
                # index_select returns the default layout; mixed layouts make oneDNN reorder
                gys = gys.contiguous(memory_format=torch.channels_last)
                ws = ws.contiguous(memory_format=torch.channels_last)
            gx, gws, gbs = torch.ops.aten.convolution_backward(
                gys, xc, ws, [k + pad] if has_bias else None, *geometry, mask
            )
        if pad > 0:
            gws = None if gws is None else gws[:k]
            gbs = None if gbs is None else gbs[:k]
        gw = _weight_grad(ctx, gws.to(w_dtype), wc.shape, idx) if need_w else None
        gb = None
        if need_b and has_bias:
            gb = _scattered(gbs.to(w_dtype), wc.shape[:1], idx)
        gx = None if gx is None else gx.to(x_dtype)
        return gx, gw, gb, None, None, None, None, None, None, None


class SkeletonLinearFn(torch.autograd.Function):
    """Dense linear forward; backward through the skeleton output features ``idx`` only.

    ``dL/dx = gY_s @ W_s``, ``dL/dW[idx] = gY_s^T @ x`` (other rows 0), ``dL/db[idx] = sum gY_s``.
    ``sink`` as for :class:`SkeletonConvFn`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor, sink: dict[Tensor, Tensor] | None = None
    ) -> Tensor:
        dt = compute_dtype(x)
        xc, wc = x.to(dt), weight.to(dt)
        y = F.linear(xc, wc, None if bias is None else bias.to(dt))
        ctx.save_for_backward(xc, wc, idx)
        ctx.conf = (x.dtype, weight.dtype, bias is not None)
        ctx.sink = (sink, weight) if sink is not None else None
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xc, wc, idx = ctx.saved_tensors
        x_dtype, w_dtype, has_bias = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gys = gy.to(wc.dtype).index_select(-1, idx)
        g2 = gys.reshape(-1, gys.shape[-1])
        gx = (gys @ wc.index_select(0, idx)).to(x_dtype) if need_x else None
        gw = None
        if need_w:
            gw = _weight_grad(ctx, (g2.t() @ xc.reshape(-1, xc.shape[-1])).to(w_dtype), wc.shape, idx)
        gb = None
        if need_b and has_bias:
            gb = _scattered(g2.sum(0).to(w_dtype), wc.shape[:1], idx)
        return gx, gw, gb, None, None


class SkeletonBatchNormFn(torch.autograd.Function):
    """Training-mode BatchNorm whose input gradient is computed for channels ``idx`` only.

    Forward: ``aten.native_batch_norm`` in training mode (running statistics updated in place, as the
    module does). Backward: ``dgamma`` and ``dbeta`` for every channel, and ``dx`` for the
    channels in ``idx`` (``dx = 0`` elsewhere), each by ``aten.native_batch_norm_backward`` (the
    fused kernel; the input gradient runs on the gathered skeleton channels). The zeros are exact
    for the caller: the conv before it discards those channels' gradient anyway. With a
    ``handoff`` (the producing :class:`SkeletonConvFn`'s), the skeleton channels' input gradient
    goes there and none is returned through autograd.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        idx: Tensor,
        handoff: dict[str, Tensor] | None = None,
    ) -> Tensor:
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, mean, invstd, weight, idx)
        ctx.eps = eps
        ctx.handoff = handoff
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, mean, invstd, weight, idx = ctx.saved_tensors
        bwd = torch.ops.aten.native_batch_norm_backward
        gy = gy.to(x.dtype)
        _, dgamma, dbeta = bwd(gy, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        gx = None
        if ctx.needs_input_grad[0]:
            w_s = weight.index_select(0, idx)
            gxs, _, _ = bwd(
                gy.index_select(1, idx),
                x.index_select(1, idx),
                w_s,
                None,
                None,
                mean.index_select(0, idx),
                invstd.index_select(0, idx),
                True,
                ctx.eps,
                [True, False, False],
            )
            if ctx.handoff is not None:
                ctx.handoff["gy"] = gxs
            else:
                gx = _scattered(gxs, x.shape, idx, 1)
        return gx, dgamma, dbeta, None, None, None, None, None, None


def skeleton_conv(
    x: Tensor,
    conv: torch.nn.Module,
    idx: Tensor,
    sink: dict[Tensor, Tensor] | None = None,
    handoff: dict[str, Tensor] | None = None,
) -> Tensor:
    """Apply :class:`SkeletonConvFn` with the geometry and parameters of ``conv``."""
    return SkeletonConvFn.apply(
        x,
        conv.weight,
        conv.bias,
        idx,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,  # type: ignore[union-attr]
        sink,
        handoff,
    )


def skeleton_linear(x: Tensor, lin: torch.nn.Linear, idx: Tensor, sink: dict[Tensor, Tensor] | None = None) -> Tensor:
    """Apply :class:`SkeletonLinearFn` with the parameters of ``lin``."""
    return SkeletonLinearFn.apply(x, lin.weight, lin.bias, idx, sink)


def skeleton_batch_norm(
    x: Tensor, bn: torch.nn.modules.batchnorm._BatchNorm, idx: Tensor, handoff: dict[str, Tensor] | None = None
) -> Tensor:
    """Apply :class:`SkeletonBatchNormFn` with the parameters and statistics of ``bn`` (training
    mode, affine, running statistics with a fixed momentum; :func:`supports_skeleton_bn` says
    whether ``bn`` qualifies). Updates ``num_batches_tracked`` as the module does. ``handoff``:
    the one given to the :func:`skeleton_conv` whose output ``x`` is, if any."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    return SkeletonBatchNormFn.apply(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps, idx, handoff
    )


def supports_skeleton_bn(bn: torch.nn.Module) -> bool:
    """Whether :func:`skeleton_batch_norm` reproduces ``bn``'s training forward: an affine
    BatchNorm with running statistics and a fixed momentum, in training mode."""
    return (
        isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and not isinstance(bn, torch.nn.SyncBatchNorm)
    )


def conv_supported(conv: torch.nn.Module) -> bool:
    """Whether :class:`SkeletonConvFn` can stand in for ``conv``: groups 1 and integer zero padding."""
    return (
        isinstance(conv, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


class CompactSkeleton:
    """Installs the compact skeleton kernels on a model's layers for one local training.

    Each covered layer's ``forward`` is replaced *on the instance* (restored by :meth:`remove`;
    the model's classes, parameters and names are untouched) by :class:`SkeletonConvFn` /
    :class:`SkeletonLinearFn` with its skeleton channels, and the BatchNorm that directly
    consumes the layer's output by :class:`SkeletonBatchNormFn`. Outside training, or without
    autograd, the original forwards run.

    Parameters
    ----------
    model:
        The client's model.
    layers:
        ``(weight name, module name, BatchNorm module name or None)`` per skeleton layer.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Sequence[tuple[str, str, str | None]],
        sink: dict[Tensor, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.sink = sink
        self.layers = list(layers)
        self._mods = dict(model.named_modules())
        self._patches = ForwardPatches()
        self._active: set[str] = set()
        self._last: dict[str, tuple[Tensor, dict[str, Tensor] | None]] = {}  # output and its handoff

    def active(self, name: str) -> bool:
        """Whether the layer with weight ``name`` runs the compact kernel (else the caller masks)."""
        return name in self._active

    def _replace(self, mod: torch.nn.Module, fwd: Any) -> None:
        self._patches.replace(mod, fwd)

    def install(self, skeleton: dict[str, Tensor]) -> None:
        """Use the kernels with ``skeleton`` (weight name -> bool channel mask) from now on."""
        self.remove()
        for name, mod_name, bn_name in self.layers:
            mod = self._mods[mod_name]
            is_lin = isinstance(mod, torch.nn.Linear)
            if not (is_lin or conv_supported(mod)):
                continue
            idx = torch.nonzero(skeleton[name].to(mod.weight.device)).flatten()  # type: ignore[union-attr]
            # a conv whose skeleton is too large to gather runs the dense kernel with masked
            # filters (SkeletonConvFn): its BatchNorm's full input gradient is needed then
            gathers = is_lin or compact_pays(len(idx), len(skeleton[name]))
            self._replace(mod, self._layer_forward(name, mod, idx, is_lin, gathers))
            self._active.add(name)
            bn = self._mods.get(bn_name) if bn_name is not None else None
            if bn is not None and gathers:
                self._replace(bn, self._bn_forward(name, bn, idx))

    def _layer_forward(self, name: str, mod: torch.nn.Module, idx: Tensor, is_lin: bool, gathers: bool) -> Any:
        orig = type(mod).forward

        def forward(x: Tensor) -> Tensor:
            if not (mod.training and torch.is_grad_enabled()):
                self._last.pop(name, None)
                return orig(mod, x)
            if is_lin:  # (a BatchNorm after it scatters its input gradient, as a linear's is rare)
                y, handoff = skeleton_linear(x, mod, idx, self.sink), None  # type: ignore[arg-type]
            elif not gathers:  # no skeleton BatchNorm after it: nothing to hand over
                return skeleton_conv(x, mod, idx, self.sink)
            else:
                handoff = {}
                y = skeleton_conv(x, mod, idx, self.sink, handoff)
            self._last[name] = (y, handoff)
            return y

        return forward

    def _bn_forward(self, name: str, bn: torch.nn.Module, idx: Tensor) -> Any:
        orig = type(bn).forward

        def forward(x: Tensor) -> Tensor:
            # Only when the input is the skeleton layer's own output: then the input gradient of
            # the other channels is discarded by that layer's compact backward, so skipping it is
            # exact. Anything else (another producer, eval mode) takes the module's own forward.
            last = self._last.pop(name, None)
            if last is not None and x is last[0] and supports_skeleton_bn(bn) and torch.is_grad_enabled():
                return skeleton_batch_norm(x, bn, idx, last[1])  # type: ignore[arg-type]
            return orig(bn, x)

        return forward

    def remove(self) -> None:
        """Restore every replaced ``forward``."""
        self._patches.restore()
        self._active.clear()
        self._last.clear()


__all__ = [
    "CompactSkeleton",
    "SkeletonBatchNormFn",
    "SkeletonConvFn",
    "SkeletonLinearFn",
    "compact_pays",
    "compute_dtype",
    "conv_supported",
    "skeleton_batch_norm",
    "skeleton_conv",
    "skeleton_linear",
    "supports_skeleton_bn",
]
