"""Structured (channel) masks: train the compacted smaller network instead of a masked big one.

:func:`compact` turns a model and a channel mask (weight name -> bool vector over the output
channels, e.g. :func:`sparsefl.pruning.criteria.skeletonization.channel_mask`) into a smaller
``nn.Module`` whose convolutions, BatchNorms and linear layers hold only the kept channels;
:func:`expand` writes the trained small parameters back into the big model. On a 2-vCPU x86
CPU a ResNet-18 at 10% of its parameters trains about 4x faster than dense this way, while the
masked big model is never faster.

How: the model is traced with ``torch.fx`` and, along the graph, every tensor carries its *live*
channels (the channel positions that can be nonzero). A conv/linear keeps its live output
channels and reads only its input's live channels; BatchNorm, ReLU and pooling keep their
input's; a residual ``add`` of operands with different live sets works on their union (the
smaller operand is scattered into it); ``flatten`` maps live channels to live features; any other
operation gets its input expanded back to full size first, so the result is always correct for
the rule below, never silently wrong.

Semantics (a departure from the masked big model, documented): a removed channel is **exactly
zero** downstream. In the masked big model a removed conv channel is zero before its BatchNorm,
but the BatchNorm then adds its shift ``beta`` (and a bias would add itself), so a constant
``relu(beta)`` channel still flows on. The compacted network drops those, as channel pruning
does; it is the network the structured mask describes, not the masked one. Tensors of removed
channels (their bias, BatchNorm parameters and statistics) are left as they were by
:func:`expand`.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

Tensor = torch.Tensor
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm
_PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.Dropout,
    nn.Identity,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
)
_PASS_FUNCS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.max_pool2d,
    torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d,
    torch.nn.functional.dropout,
    torch.nn.functional.gelu,
}


class _Tracer(fx.Tracer):
    """Keeps the pass-through modules whole, also subclasses defined outside torch.nn (e.g.
    :class:`sparsefl.kernels.pool.MaxPool2d`), which fx would otherwise trace into."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _PASS_MODULES) or super().is_leaf_module(m, module_qualified_name)


class ScatterChannels(nn.Module):
    """Place a compact tensor's channels at ``pos`` (dim 1) of a zero tensor with ``size`` channels."""

    def __init__(self, pos: Tensor, size: int) -> None:
        super().__init__()
        self.register_buffer("pos", pos.clone(), persistent=False)
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        shape = list(x.shape)
        shape[1] = self.size
        return x.new_zeros(shape).index_copy_(1, self.pos, x)


@dataclass
class CompactPlan:
    """What :func:`compact` kept: per module name, the kept output and input indices (None = all)."""

    modules: dict[str, tuple[Tensor | None, Tensor | None]] = field(default_factory=dict)

    def kept_params(self, big: nn.Module) -> tuple[int, int]:
        """``(parameters of the compact network's compacted modules, of the same modules in big)``."""
        small = total = 0
        mods = dict(big.named_modules())
        for name, (out, inp) in self.modules.items():
            m = mods[name]
            for p_name, p in m.named_parameters(recurse=False):
                total += p.numel()
                n_out = p.shape[0] if out is None else len(out)
                n_in = (p.shape[1] if inp is None else len(inp)) if p.dim() > 1 and p_name == "weight" else 1
                small += n_out * n_in * (p[0, 0].numel() if p.dim() > 2 else 1) if p.dim() > 1 else n_out
        return small, total


def _pos_in(sub: Tensor, sup: Tensor) -> Tensor:
    """Positions of the (sorted) indices ``sub`` inside the (sorted) indices ``sup``."""
    return torch.searchsorted(sup, sub)


def _slice_module(m: nn.Module, out: Tensor | None, inp: Tensor | None) -> nn.Module:
    m = copy.deepcopy(m)
    with torch.no_grad():
        if isinstance(m, (*_CONV, nn.Linear)):
            w = m.weight
            if out is not None:
                w = w.index_select(0, out)
            if inp is not None:
                w = w.index_select(1, inp)
            m.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
            if m.bias is not None and out is not None:
                m.bias = nn.Parameter(m.bias.index_select(0, out).clone(), requires_grad=m.bias.requires_grad)
            if isinstance(m, nn.Linear):
                m.out_features, m.in_features = m.weight.shape
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, _BN) and out is not None:
            for n in ("weight", "bias"):
                p = getattr(m, n)
                if p is not None:
                    setattr(m, n, nn.Parameter(p.index_select(0, out).clone(), requires_grad=p.requires_grad))
            for n in ("running_mean", "running_var"):
                b = getattr(m, n)
                if b is not None:
                    setattr(m, n, b.index_select(0, out).clone())
            m.num_features = len(out)
    return m


def compact(
    model: nn.Module, channel_mask: Mapping[str, Tensor], input_shape: tuple[int, ...]
) -> tuple[fx.GraphModule, CompactPlan]:
    """The compacted network of ``model`` under ``channel_mask`` (see the module docstring).

    Parameters
    ----------
    model:
        Any fx-traceable model (every registered model is); it is not modified.
    channel_mask:
        Conv/Linear weight name -> bool vector over that layer's output channels (True = kept).
        Layers not named keep all their output channels.
    input_shape:
        One sample's shape (for shape propagation through ``flatten``).

    Returns
    -------
    The compact ``GraphModule`` (same inputs and output shape as ``model``) and the
    :class:`CompactPlan` that :func:`expand` needs.
    """
    root = copy.deepcopy(model)
    gm = fx.GraphModule(root, _Tracer().trace(root))
    was_training = gm.training
    gm.eval()
    device = next(iter([*root.parameters(), *root.buffers()]), torch.zeros(0)).device
    ShapeProp(gm).propagate(torch.zeros(2, *input_shape, device=device))  # where the model is
    gm.train(was_training)
    mods = dict(gm.named_modules())
    live: dict[fx.Node, Tensor | None] = {}
    plan = CompactPlan()
    graph = gm.graph
    n_scatter = 0

    def full_size(node: fx.Node) -> int:
        return int(node.meta["tensor_meta"].shape[1])

    def expand_to(node: fx.Node, user: fx.Node, pos: Tensor, size: int) -> fx.Node:
        nonlocal n_scatter
        name = f"_scatter_{n_scatter}"
        n_scatter += 1
        gm.add_submodule(name, ScatterChannels(pos, size))
        with graph.inserting_before(user):
            return graph.call_module(name, (node,))

    def materialize(user: fx.Node) -> None:
        """Expand every compact tensor argument of ``user`` back to full size."""
        for a in list(user.all_input_nodes):
            s = live.get(a)
            if s is not None:
                user.replace_input_with(a, expand_to(a, user, s, full_size(a)))

    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            live[node] = None
            continue
        if node.op == "output":
            materialize(node)
            continue
        args = [a for a in node.args if isinstance(a, fx.Node)]
        src = live.get(args[0]) if args else None
        if node.op == "call_module":
            m = mods[str(node.target)]
            if isinstance(m, (*_CONV, nn.Linear)) and m.weight is not None:
                cm = channel_mask.get(f"{node.target}.weight")
                out = None if cm is None or bool(cm.all()) else torch.nonzero(cm).flatten()
                if isinstance(m, _CONV) and m.groups != 1:
                    materialize(node)
                    src = None
                    out = None
                if out is not None or src is not None:
                    plan.modules[str(node.target)] = (out, src)
                    gm.add_submodule(str(node.target), _slice_module(m, out, src))
                live[node] = out
                continue
            if isinstance(m, _BN):
                if src is not None:
                    plan.modules[str(node.target)] = (src, None)
                    gm.add_submodule(str(node.target), _slice_module(m, src, None))
                live[node] = src
                continue
            if isinstance(m, _PASS_MODULES):
                live[node] = src
                continue
        if node.op == "call_function" and node.target in _PASS_FUNCS and len(args) == 1:
            live[node] = src
            continue
        if node.op in ("call_function", "call_method") and node.target in (operator.add, torch.add, "add"):
            if len(args) == 2 and len(node.args) == 2:
                sets = [live.get(a) for a in args]
                if all(s is not None for s in sets):
                    union = torch.unique(torch.cat(sets))  # type: ignore[arg-type]
                    for a, s in zip(args, sets):
                        if len(s) != len(union):  # type: ignore[arg-type]
                            node.replace_input_with(a, expand_to(a, node, _pos_in(s, union), len(union)))  # type: ignore[arg-type]
                    live[node] = union
                    continue
        if node.op in ("call_function", "call_method") and node.target in (torch.flatten, "flatten") and args:
            shape = args[0].meta.get("tensor_meta")
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            if src is not None and shape is not None and start == 1:
                per = int(torch.tensor(shape.shape[2:]).prod()) if len(shape.shape) > 2 else 1
                live[node] = (src.view(-1, 1) * per + torch.arange(per).view(1, -1)).flatten()
                continue
        materialize(node)
        live[node] = None
    graph.lint()
    gm.recompile()
    return gm, plan


def _pairs(big: nn.Module, small: nn.Module, plan: CompactPlan):  # type: ignore[no-untyped-def]
    """``(name, kept rows or None, kept columns or None, big tensor, small tensor)`` for every
    parameter and buffer of a compacted module, then ``(key, None, None, big, small)`` for every
    state_dict entry of an uncompacted module (copied whole both ways)."""
    bmods = dict(big.named_modules())
    smods = dict(small.named_modules())
    for name, (out, inp) in plan.modules.items():
        b, s = bmods[name], smods[name]
        for n, t in list(s.named_parameters(recurse=False)) + list(s.named_buffers(recurse=False)):
            dst = getattr(b, n)
            if dst is not None and t is not None:
                yield n, out, inp, dst, t
    bsd, ssd = big.state_dict(), small.state_dict()
    for k, v in ssd.items():
        if k.rpartition(".")[0] not in plan.modules and k in bsd and bsd[k].shape == v.shape:
            yield k, None, None, bsd[k], v


@torch.no_grad()
def expand(big: nn.Module, small: nn.Module, plan: CompactPlan) -> None:
    """Write ``small``'s trained tensors back into ``big`` at the kept positions, in place.

    Tensors of removed channels and modules the plan does not name keep their values in ``big``
    except that uncompacted modules are copied whole (they trained in ``small`` too).
    """
    for n, out, inp, dst, t in _pairs(big, small, plan):
        if n == "num_batches_tracked" or (out is None and inp is None):
            dst.copy_(t)
            continue
        rows = out if out is not None else torch.arange(dst.shape[0])
        if dst.dim() > 1 and n == "weight" and inp is not None:
            sub = dst.index_select(0, rows)
            sub.index_copy_(1, inp, t)
            dst.index_copy_(0, rows, sub)
        else:
            dst.index_copy_(0, rows, t)


@torch.no_grad()
def gather(big: nn.Module, small: nn.Module, plan: CompactPlan) -> None:
    """Load ``big``'s tensors at the kept positions into ``small`` (the inverse of :func:`expand`),
    so one compact network built by :func:`compact` serves any model of the same architecture."""
    for n, out, inp, src, dst in _pairs(big, small, plan):
        if n == "num_batches_tracked":
            dst.copy_(src)
            continue
        t = src if out is None else src.index_select(0, out)
        if t.dim() > 1 and n == "weight" and inp is not None:
            t = t.index_select(1, inp)
        dst.copy_(t)


def channel_masks(mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weight name -> kept output channels of a channel-structured weight mask.

    Raises ``ValueError`` naming the first weight whose mask is not whole rows (every entry of an
    output channel kept, or every entry removed).
    """
    out = {}
    for name, m in mask.items():
        rows = m.to(torch.bool).reshape(m.shape[0], -1)
        keep = rows.any(1)
        if not torch.equal(rows, keep[:, None].expand_as(rows)):
            raise ValueError(f"the mask of {name!r} is not channel-structured (whole output channels)")
        out[name] = keep
    return out


def zero_removed(big: nn.Module, plan: CompactPlan) -> None:
    """Zero what is left of the channels :func:`compact` removed in ``big``: their conv/linear
    rows and biases and their BatchNorm scale and shift, so the big model computes exactly the
    compact network (a removed channel contributes 0 downstream, as in the compact one)."""
    mods = dict(big.named_modules())
    with torch.no_grad():
        for name, (out, _) in plan.modules.items():
            if out is None:
                continue
            m = mods[name]
            for n in ("weight", "bias"):
                t = getattr(m, n, None)
                if isinstance(t, Tensor):
                    removed = torch.ones(t.shape[0], dtype=torch.bool)
                    removed[out] = False
                    t[removed] = 0


#: compact networks by (architecture, channel mask, input shape); the least recently used go first
_COMPACT_CACHE: dict[tuple, tuple[fx.GraphModule, CompactPlan]] = {}
_COMPACT_CACHE_SIZE = 4


class CompactTraining:
    """Train the compacted network of a channel-structured mask instead of the masked big model.

    ``small`` holds the kept channels (:func:`compact`); the training loop optimises its
    parameters; :meth:`close` writes them back into the big model (:func:`expand`) and zeroes the
    removed channels' remaining tensors (:func:`zero_removed`). Semantics: a removed channel is
    removed entirely (its bias and BatchNorm shift no longer reach the next layer), which a
    masked big model does not do; the big model after :meth:`close` computes the compact network.
    """

    def __init__(self, model: nn.Module, mask: Mapping[str, Tensor], input_shape: tuple[int, ...]) -> None:
        self.model = model
        channels = channel_masks(mask)
        key = (
            type(model).__qualname__,
            tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()),
            tuple((k, v.numpy().tobytes()) for k, v in sorted(channels.items())),
            tuple(input_shape),
        )
        hit = _COMPACT_CACHE.pop(key, None)
        if hit is None:  # tracing and slicing once per architecture and mask, per process
            hit = compact(model, channels, input_shape)
        _COMPACT_CACHE[key] = hit
        while len(_COMPACT_CACHE) > _COMPACT_CACHE_SIZE:
            _COMPACT_CACHE.pop(next(iter(_COMPACT_CACHE)))
        self.small, self.plan = hit
        for name, keep in channels.items():
            mod = name[: -len(".weight")] if name.endswith(".weight") else name
            if not bool(keep.all()) and self.plan.modules.get(mod, (None, None))[0] is None:
                raise ValueError(
                    f"layer {mod!r} cannot be compacted (e.g. a grouped convolution); "
                    "train it masked (method.compact=false)"
                )
        gather(model, self.small, self.plan)
        for p in self.small.parameters():
            p.grad = None
        self.small.train(model.training)

    def densities(self) -> dict[str, tuple[float, float]]:
        """Per compacted conv/linear weight name: (kept output fraction, kept input fraction);
        this includes layers outside the mask whose inputs shrank."""
        mods = dict(self.model.named_modules())
        out: dict[str, tuple[float, float]] = {}
        for mod_name, (o, i) in self.plan.modules.items():
            m = mods[mod_name]
            if not isinstance(m, (*_CONV, nn.Linear)):
                continue
            fo = 1.0 if o is None else len(o) / m.weight.shape[0]
            fi = 1.0 if i is None else len(i) / (m.weight.shape[1] * getattr(m, "groups", 1))
            out[f"{mod_name}.weight"] = (fo, fi)
        return out

    def close(self) -> None:
        """Write the trained compact tensors into the big model and zero the removed channels."""
        with torch.no_grad():
            expand(self.model, self.small, self.plan)
        zero_removed(self.model, self.plan)


__all__ = [
    "CompactPlan",
    "CompactTraining",
    "ScatterChannels",
    "channel_masks",
    "compact",
    "expand",
    "gather",
    "zero_removed",
]
