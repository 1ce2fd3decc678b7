"""FLOP accounting: the one convention, written once (in full, with reasons: ``docs/accounting.md``).

Only convolutions (``nn.Conv1d/2d/3d``, grouped and depthwise included) and ``nn.Linear`` are
counted, each multiply-accumulate (MAC) as 2 FLOPs: what
:class:`torch.utils.flop_counter.FlopCounterMode` counts for these networks, which the tests
check on every registered model. Biases, BatchNorm, activations, pooling, residual additions,
softmax, the loss and the optimiser update are left out. Training FLOPs are forward + backward,
inference FLOPs the forward alone. Sparsity enters as per-layer densities
(:class:`LayerDensity`), and the dense count is always reported beside the effective one
(:class:`FlopCount`). For one sample and a layer with ``m`` MACs and densities ``(f, gi, gw)``::

    forward        = 2 * m * f
    backward       = 2 * m * gw + (0 if first else 2 * m * gi)
    forward_dense  = 2 * m
    backward_dense = 2 * m + (0 if first else 2 * m)

A ``first`` layer's input depends on no parameter (the stem conv reading the raw images), so it
has no input-gradient product. A batch of ``n`` samples counts ``n`` times these, summed over
the layers. Typical use::

    profile = profile_model(model, input_shape=(3, 32, 32))       # once per architecture
    step = train_flops(profile, num_samples=64, densities={
        "conv1.weight": LayerDensity(forward=0.3, grad_weight=0.3, grad_input=0.3),
    })
    total = total + step                                          # FlopCount supports +
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

Tensor = torch.Tensor

#: FLOPs per multiply-accumulate: one multiply plus one add.
FLOPS_PER_MAC = 2

#: Module types whose work is counted (subclasses included, as with ``isinstance``).
COUNTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------------------------------
# Profile: layer shapes, measured once
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerProfile:
    """The shape facts of one counted layer, for one sample.

    Attributes
    ----------
    name:
        State_dict name of the layer's weight (``"layers.0.0.conv1.weight"``), the key masks use.
    kind:
        ``"conv"`` or ``"linear"``.
    macs:
        Dense multiply-accumulates of the layer's forward for one sample (summed over all calls
        when the module runs more than once in a forward pass).
    weight_numel:
        Number of elements of the weight tensor.
    out_channels:
        ``out_channels`` of a convolution, ``out_features`` of a linear layer.
    first:
        True when the layer's input needs no gradient (it depends on no parameter, e.g. the raw
        model input), so its backward has no input-gradient product.
    """

    name: str
    kind: Literal["conv", "linear"]
    macs: int
    weight_numel: int
    out_channels: int
    first: bool


@dataclass(frozen=True)
class ModelProfile:
    """The counted layers of a model, in forward order, as measured by :func:`profile_model`.

    Attributes
    ----------
    input_shape:
        Shape of one sample (no batch dimension) the profile was measured with.
    layers:
        One :class:`LayerProfile` per counted layer that ran, in order of first call.
    """

    input_shape: tuple[int, ...]
    layers: tuple[LayerProfile, ...]
    _by_name: dict[str, LayerProfile] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {layer.name: layer for layer in self.layers}
        if len(by_name) != len(self.layers):
            raise ValueError("ModelProfile: layer names must be unique")
        object.__setattr__(self, "_by_name", by_name)

    def names(self) -> tuple[str, ...]:
        """State_dict weight names of the counted layers, in forward order."""
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> LayerProfile:
        """The profile of the layer whose weight is called ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(_unknown_message(name, self)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def macs(self) -> int:
        """Dense forward multiply-accumulates of one sample, all counted layers."""
        return sum(layer.macs for layer in self.layers)

    def dense_forward(self) -> int:
        """Dense forward FLOPs of one sample (``2 * macs``)."""
        return FLOPS_PER_MAC * self.macs()

    def dense_backward(self) -> int:
        """Dense backward FLOPs of one sample: weight gradients of every layer plus input
        gradients of every layer that is not ``first``."""
        return sum(_dense(layer)[1] for layer in self.layers)

    def dense_train(self) -> int:
        """Dense training FLOPs of one sample: :meth:`dense_forward` + :meth:`dense_backward`."""
        return self.dense_forward() + self.dense_backward()


def profile_model(model: nn.Module, input_shape: tuple[int, ...]) -> ModelProfile:
    """Measure the counted layers of ``model`` with one forward pass on a batch of one sample.

    The model comes back exactly as it went in: the pass runs in eval mode (so BatchNorm
    statistics are not updated and a batch of one is legal) and the previous train/eval flags
    are restored afterwards; the forward hooks are removed; weights and buffers are not written.

    How ``first`` is found: the pass runs with autograd enabled on an all-zero input that does
    not require grad, through :func:`torch.func.functional_call` with every floating-point
    parameter replaced by a detached alias that *does* require grad (no copy; the model's own
    parameters and their ``requires_grad`` flags are untouched). A layer is ``first`` exactly
    when the tensor it receives does not require grad, i.e. when autograd, with every parameter
    trained, would compute no gradient for it. This holds however the input is reshaped on the
    way (``x.flatten(1)`` before an MLP's first layer) and does not depend on parameters the user
    may have frozen: freezing is a training choice, expressed with :class:`LayerDensity`.

    Parameters
    ----------
    model:
        Any ``nn.Module``. Only ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (and their subclasses) are
        counted; a module that does not run in the forward pass is not in the profile.
    input_shape:
        Shape of one sample without the batch dimension, e.g. ``(3, 32, 32)``.

    Returns
    -------
    ModelProfile
        Counted layers in order of their first call.

    Notes
    -----
    Per-sample counts assume every counted layer's work is proportional to the batch size, as in
    all feed-forward classifiers. Eval and train mode are assumed to run the same layers on the
    same shapes (true unless a model has train-only branches). A module called several times
    (shared weights) is one entry: its MACs are summed over the calls, and it is ``first`` only
    if every call reads an input that needs no gradient.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if any(d < 0 for d in input_shape):
        raise ValueError(f"input_shape must be non-negative sizes; got {input_shape}")
    names = {
        mod: (f"{mod_name}.weight" if mod_name else "weight")
        for mod_name, mod in model.named_modules()
        if isinstance(mod, COUNTED_TYPES) and getattr(mod, "weight", None) is not None
    }
    # name -> [macs, first, module]; dict order = order of first call.
    seen: dict[str, list] = {}

    def hook(mod: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(f"{names[mod]}: expected a tensor output, got {type(out).__name__}")
        x = args[0] if args else kwargs.get("input")
        first = not (isinstance(x, Tensor) and x.requires_grad)
        # The batch holds one sample, so the output's numel is the per-sample count.
        if isinstance(mod, nn.Linear):
            macs = out.numel() * mod.in_features
        else:
            conv: nn.Conv1d = mod  # type: ignore[assignment]
            macs = out.numel() * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
        rec = seen.setdefault(names[mod], [0, True, mod])
        rec[0] += macs
        rec[1] = rec[1] and first  # a layer is first only if it is first in every call

    modes = {mod: mod.training for mod in model.modules()}
    handles = [mod.register_forward_hook(hook, with_kwargs=True) for mod in names]
    try:
        model.eval()
        # Grad mode on even inside the caller's no_grad/inference_mode: ``first`` is read from
        # ``requires_grad``. Nothing is differentiated; the graph is dropped on return.
        with torch.inference_mode(False), torch.enable_grad():
            params = {
                n: p.detach().requires_grad_(p.is_floating_point() or p.is_complex())
                for n, p in model.named_parameters()
            }
            ref = next(iter(params.values()), None)
            if ref is None:
                ref = next(model.buffers(), None)
            device = ref.device if ref is not None else torch.device("cpu")
            floating = ref is not None and ref.is_floating_point()
            dtype = ref.dtype if floating else torch.get_default_dtype()
            x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
            torch.func.functional_call(model, params, (x,))
    finally:
        for h in handles:
            h.remove()
        for mod, training in modes.items():
            mod.training = training

    layers = tuple(
        LayerProfile(
            name=name,
            kind="linear" if isinstance(mod, nn.Linear) else "conv",
            macs=int(macs),
            weight_numel=mod.weight.numel(),
            out_channels=int(mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels),
            first=bool(first),
        )
        for name, (macs, first, mod) in seen.items()
    )
    return ModelProfile(input_shape=input_shape, layers=layers)


# --------------------------------------------------------------------------------------------------
# Densities and counts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerDensity:
    """Fractions of one layer's dense MACs that really ran, one per product (all in [0, 1]).

    Attributes
    ----------
    forward:
        Fraction of the forward MACs (``out = W * x``) computed: e.g. the weight density for
        top-k weights (SWAT, ZeroFL) or a static mask, the fraction of output channels computed
        under dynamic channel gating.
    grad_input:
        Fraction of the input-gradient MACs (``dL/dx = W^T * dL/dout``) computed, e.g. the weight
        density when the backward uses the sparse weights. Ignored for ``first`` layers, which
        have no input-gradient product.
    grad_weight:
        Fraction of the weight-gradient MACs (``dL/dW = dL/dout * x^T``) computed, e.g. the
        activation density (SWAT, ZeroFL) or the skeleton fraction (FedSkel).
    """

    forward: float = 1.0
    grad_input: float = 1.0
    grad_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("forward", "grad_input", "grad_weight"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"LayerDensity.{key} must be a number in [0, 1]; got {value!r}")
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"LayerDensity.{key} must be in [0, 1]; got {value!r}")
            object.__setattr__(self, key, float(value))


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of some work, the effective count beside the dense one.

    The dense counts are exact integers; the effective counts are floats, since densities are
    fractions. Counts add with ``+`` (and ``sum(counts)`` works), so per-step counts can be
    accumulated over a round or a run.

    Attributes
    ----------
    forward, backward:
        Effective FLOPs: dense FLOPs of each product times the density that applied.
    forward_dense, backward_dense:
        FLOPs the same work would cost with every density 1.
    """

    forward: float = 0.0
    backward: float = 0.0
    forward_dense: int = 0
    backward_dense: int = 0

    @property
    def total(self) -> float:
        """Effective forward + backward FLOPs."""
        return self.forward + self.backward

    @property
    def total_dense(self) -> int:
        """Dense forward + backward FLOPs."""
        return self.forward_dense + self.backward_dense

    def __add__(self, other: FlopCount) -> FlopCount:
        if not isinstance(other, FlopCount):
            return NotImplemented
        return FlopCount(
            forward=self.forward + other.forward,
            backward=self.backward + other.backward,
            forward_dense=self.forward_dense + other.forward_dense,
            backward_dense=self.backward_dense + other.backward_dense,
        )

    def __radd__(self, other: object) -> FlopCount:
        # Lets the builtin ``sum`` start from 0.
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented


def train_flops(
    profile: ModelProfile,
    num_samples: int,
    densities: Mapping[str, LayerDensity] | None = None,
) -> FlopCount:
    """FLOPs of training on ``num_samples`` samples (forward + backward, as the module docstring says).

    Parameters
    ----------
    profile:
        From :func:`profile_model`.
    num_samples:
        Samples that went through forward and backward (e.g. the batch size of one step, or
        ``epochs * dataset size`` for a whole local training).
    densities:
        ``weight name -> LayerDensity`` for the layers that ran sparse; missing layers are dense.
        A name the profile does not know raises ``ValueError``.
    """
    return _count(profile, num_samples, densities, backward=True)


def inference_flops(
    profile: ModelProfile,
    num_samples: int,
    densities: Mapping[str, LayerDensity] | None = None,
) -> FlopCount:
    """FLOPs of inference on ``num_samples`` samples (forward only; ``backward`` counts are 0).

    Only ``LayerDensity.forward`` is used. Parameters as in :func:`train_flops`.
    """
    return _count(profile, num_samples, densities, backward=False)


# --------------------------------------------------------------------------------------------------
# Internals: the convention's arithmetic lives here and nowhere else
# --------------------------------------------------------------------------------------------------

_DENSE = LayerDensity()


def _dense(layer: LayerProfile) -> tuple[int, int]:
    """Dense (forward, backward) FLOPs of one sample through ``layer``."""
    flops = FLOPS_PER_MAC * layer.macs
    return flops, flops * (1 if layer.first else 2)


def _effective(layer: LayerProfile, d: LayerDensity) -> tuple[float, float]:
    """Effective (forward, backward) FLOPs of one sample through ``layer`` under ``d``."""
    flops = FLOPS_PER_MAC * layer.macs
    backward = flops * d.grad_weight + (0.0 if layer.first else flops * d.grad_input)
    return flops * d.forward, backward


def _unknown_message(name: str, profile: ModelProfile) -> str:
    known = ", ".join(profile.names()) or "(none)"
    return (
        f"no counted layer has the weight {name!r}; densities must be keyed by the state_dict "
        f"name of the weight of a Conv/Linear layer that ran in the profiled forward pass: {known}"
    )


def _count(
    profile: ModelProfile,
    num_samples: int,
    densities: Mapping[str, LayerDensity] | None,
    *,
    backward: bool,
) -> FlopCount:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0; got {num_samples!r}")
    densities = {} if densities is None else densities
    for name, d in densities.items():
        if name not in profile:
            raise ValueError(_unknown_message(name, profile))
        if not isinstance(d, LayerDensity):
            raise TypeError(f"densities[{name!r}] must be a LayerDensity; got {type(d).__name__}")
    fwd = bwd = 0.0
    fwd_dense = bwd_dense = 0
    for layer in profile.layers:
        f_dense, b_dense = _dense(layer)
        f_eff, b_eff = _effective(layer, densities.get(layer.name, _DENSE))
        fwd += f_eff
        fwd_dense += f_dense
        if backward:
            bwd += b_eff
            bwd_dense += b_dense
    return FlopCount(
        forward=fwd * num_samples,
        backward=bwd * num_samples,
        forward_dense=fwd_dense * num_samples,
        backward_dense=bwd_dense * num_samples,
    )
