"""Adaptive dynamic pruning for non-IID FL (Yu et al.): per-sample channel gating, sparse uploads.

Yu, Nguyen, Anwar, Jannesari, "Adaptive Dynamic Pruning for Non-IID Federated Learning" (arXiv
2106.06921). Every convolution followed by a BatchNorm gets a small gate predictor
(Feature-Boosting-and-Suppression style, Gao et al., ICLR 2019) that keeps, per sample, the
``density`` fraction of channels with the highest predicted saliency (winner-take-all); the
client uploads only the channels its gating kept most often over the round (the ``density``
fraction of each layer), so the upload shrinks with ``density``. ``variant=threshold`` zeroes
small conv weights instead (the codecs send a zeroed weight in next to no bytes). Inference
FLOPs are measured on the test inputs, since the computation depends on them. Options and every
choice where the paper is silent: ``docs/methods/dynamic.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefl.accounting import LayerDensity, ModelProfile, inference_flops
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.methods.base import LocalHooks, Method
from sparsefl.models import ModelSpec
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.messages import ClientState, LocalContext, Received, ServerState, StateDict
from sparsefl.registry import METHODS
from sparsefl.rng import seeded_torch

Tensor = torch.Tensor
Variant = Literal["gating", "threshold"]
UploadRule = Literal["kept", "used"]

#: Namespace of the saliency predictors in the gated model's state_dict.
GATES = "gates"
# Client-state key prefix: + conv module name -> int64 (C_out,) samples that kept each channel
# this round.
_USED = "dynamic.used."


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynamicConfig(MethodConfig):
    """Options of Yu et al.'s dynamic pruning (docs/methods)."""

    variant: Variant = opt("gating", "gating: v1 per-sample channel gating; threshold: v2 |w| <= threshold zeroing")
    density: float = opt(0.7, "gating: fraction of each gated conv's output channels kept per sample", gt=0, le=1)
    sigmoid_on_pool: bool = opt(False, "gating: sigmoid on the pooled input before the predictor (VGG reference)")
    l1: float = opt(0.0, "gating: weight of the mean L1 norm of the gates added to the loss", ge=0)
    gate_shortcut: bool = opt(False, "gating: also gate 1x1 projection shortcuts (shortcut/downsample modules)")
    threshold: float = opt(1e-3, "threshold: conv weights with |w| <= this are zeroed after every local epoch", ge=0)
    upload: UploadRule = opt(
        "kept",
        "gating: kept uploads each layer's density fraction of channels kept most often this round; "
        "used uploads every channel kept for any sample (everything that received gradient)",
    )

    def __post_init__(self) -> None:
        if self.sparsity != 0:
            raise ConfigError(
                "method.sparsity", self.sparsity, "0 for dynamic (set method.density, the kept channel fraction)"
            )


def keep_count(density: float, channels: int) -> int:
    """Channels kept per sample: ``clip(round(density * channels), 1, channels)``."""
    return min(channels, max(1, int(round(density * channels))))


def gate_key(conv_name: str) -> str:
    """ModuleDict key of the predictor of the conv ``conv_name`` (``.`` -> ``__``)."""
    return conv_name.replace(".", "__")


# --------------------------------------------------------------------------------------------------
# The gated model
# --------------------------------------------------------------------------------------------------


def find_gated_pairs(
    model: nn.Module, input_shape: tuple[int, ...], gate_shortcut: bool = False
) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` of every ``Conv2d`` whose next module call is a ``BatchNorm2d``
    of its output width, in forward order (one traced eval pass on a deep copy; the model is
    not touched). Grouped convolutions and, unless ``gate_shortcut``, modules under a
    ``shortcut``/``downsample`` name are skipped."""
    probe = copy.deepcopy(model).eval()
    names = {m: n for n, m in probe.named_modules()}
    calls: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, a, o: calls.append(names[mod]))
        for m in probe.modules()
        if len(list(m.children())) == 0
    ]
    try:
        with torch.no_grad():
            probe(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    mods = dict(probe.named_modules())
    pairs: list[tuple[str, str]] = []
    for a, b in zip(calls, calls[1:]):
        conv, bn = mods[a], mods[b]
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            continue
        if conv.groups != 1 or bn.num_features != conv.out_channels or (a, b) in pairs:
            continue
        if not gate_shortcut and any(p in ("shortcut", "downsample") for p in a.split(".")):
            continue
        pairs.append((a, b))
    return pairs


class GatedModel(nn.Module):
    """The user's model with FBS-style per-sample channel gates (docs/methods).

    The user's model is held unregistered as ``net``; its children (and any root parameters and
    buffers) are registered here under their own names, so the state_dict names are the
    model's own plus ``gates.*``. Forward is ``net(x)``; the gating is done by forward hooks on
    the gated convs (pre-hook: predict the gate from the conv input) and their BNs (hook: multiply
    the BN output by the gate).

    Attributes
    ----------
    pairs:
        ``(conv name, bn name)`` of the gated layers.
    kept_fraction:
        Conv name -> mean fraction of output channels kept over the samples of the last forward.
    recorder:
        When not None, conv name -> int64 ``(C_out,)`` count of samples that kept each channel,
        updated on every forward (set by :class:`DynamicHooks` during training).
    last_gates:
        Conv name -> the gates ``g`` of the last forward (``(N, C_out)``, differentiable), for the
        L1 penalty.
    """

    def __init__(self, net: nn.Module, pairs: Sequence[tuple[str, str]], density: float, sigmoid_on_pool: bool) -> None:
        super().__init__()
        object.__setattr__(self, "net", net)  # held, not registered: names stay unprefixed
        if GATES in dict(net.named_children()) or hasattr(net, GATES):
            raise ValueError(f"dynamic: the model already has an attribute {GATES!r}; cannot add the predictors")
        for n, p in net._parameters.items():
            if p is not None:
                self.register_parameter(n, p)
        for n, b in net._buffers.items():
            if b is not None:
                self.register_buffer(n, b, persistent=n not in net._non_persistent_buffers_set)
        for n, child in net.named_children():
            self.add_module(n, child)
        mods = dict(net.named_modules())
        self.pairs = list(pairs)
        self.density = density
        self.sigmoid_on_pool = sigmoid_on_pool
        self.gates = nn.ModuleDict()
        for conv_name, _ in self.pairs:
            conv = mods[conv_name]
            assert isinstance(conv, nn.Conv2d)
            lin = nn.Linear(conv.in_channels, conv.out_channels)
            nn.init.kaiming_normal_(lin.weight)
            nn.init.ones_(lin.bias)
            self.gates[gate_key(conv_name)] = lin
        self.kept_fraction: dict[str, float] = {}
        self.recorder: dict[str, Tensor] | None = None
        self.last_gates: dict[str, Tensor] = {}
        self._pending: dict[str, Tensor] = {}
        for conv_name, bn_name in self.pairs:
            mods[conv_name].register_forward_pre_hook(self._predict_hook(conv_name))
            mods[bn_name].register_forward_hook(self._gate_hook(conv_name))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> GatedModel:
        super().train(mode)
        self.net.training = mode
        return self

    def saliency(self, conv_name: str, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """``(gates g, kept mask)`` of one gated layer for the conv input ``x_in``: both
        ``(N, C_out)``; the mask has exactly :func:`keep_count` True entries per row."""
        z = x_in.mean(dim=(2, 3))
        if self.sigmoid_on_pool:
            z = torch.sigmoid(z)
        s = F.relu(self.gates[gate_key(conv_name)](z))
        k = keep_count(self.density, s.shape[1])
        idx = s.topk(k, dim=1).indices
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True)
        return s * keep.to(s.dtype), keep

    def _predict_hook(self, conv_name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple) -> None:
            g, keep = self.saliency(conv_name, args[0])
            self._pending[conv_name] = g
            self.last_gates[conv_name] = g
            self.kept_fraction[conv_name] = float(keep.float().mean())
            if self.recorder is not None:
                count = keep.sum(dim=0)
                prev = self.recorder.get(conv_name)
                self.recorder[conv_name] = count if prev is None else prev + count

        return hook

    def _gate_hook(self, conv_name: str):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            g = self._pending.pop(conv_name)
            return out * g[:, :, None, None].to(out.dtype)

        return hook


# --------------------------------------------------------------------------------------------------
# Client hooks
# --------------------------------------------------------------------------------------------------


class DynamicHooks(LocalHooks):
    """Gated local SGD: records how many samples kept each channel into ``client_state`` (keys
    ``dynamic.used.<conv name>``), adds the optional L1 penalty, reports the kept fractions."""

    def __init__(self, model: GatedModel, profile: ModelProfile, client_state: ClientState, l1: float) -> None:
        super().__init__(model, profile)
        self.gated = model
        self.l1 = l1
        self._state = client_state
        self._used: dict[str, Tensor] = {}
        model.recorder = self._used

    def loss(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """Cross-entropy, plus ``l1`` times the mean absolute gate value over the gated layers."""
        loss = F.cross_entropy(logits, y)
        if self.l1 > 0 and self.gated.last_gates:
            pen = sum(g.abs().mean() for g in self.gated.last_gates.values())
            loss = loss + self.l1 * pen / len(self.gated.last_gates)
        return loss

    def after_step(self, step: int) -> None:
        for name, used in self._used.items():
            self._state[_USED + name] = used.clone()

    def densities(self) -> Mapping[str, LayerDensity]:
        """Per gated conv: the last step's mean kept fraction for all three products."""
        return {
            f"{name}.weight": LayerDensity(forward=d, grad_input=d, grad_weight=d)
            for name, d in self.gated.kept_fraction.items()
        }

    def close(self) -> None:
        self.gated.recorder = None


class ThresholdHooks(LocalHooks):
    """The v2 artifact's rule: after every local epoch, conv weights with ``|w| <= threshold``
    are zeroed in place (the epoch ends after ``steps_per_epoch`` optimiser steps)."""

    def __init__(self, model: nn.Module, profile: ModelProfile, threshold: float, steps_per_epoch: int) -> None:
        super().__init__(model, profile)
        self.threshold = threshold
        self.steps_per_epoch = max(1, steps_per_epoch)
        self._convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]

    @torch.no_grad()
    def prune(self) -> None:
        """Zero every conv weight with ``|w| <= threshold``."""
        for m in self._convs:
            m.weight.masked_fill_(m.weight.abs() <= self.threshold, 0.0)

    def after_step(self, step: int) -> None:
        if (step + 1) % self.steps_per_epoch == 0:
            self.prune()


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches :func:`sparsefl.methods.base.iter_batches` yields per epoch (a trailing batch of
    one sample is dropped when n > 1)."""
    bs = min(batch_size, n)
    full, rest = divmod(n, bs)
    return full + (1 if rest > 1 or (rest == 1 and n == 1) else 0)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@METHODS.register("dynamic", DynamicConfig, summary="Yu et al. dynamic pruning: per-sample channel gating (FBS-style)")
class Dynamic(Method):
    """Yu et al.'s adaptive dynamic pruning (v1 gating, or the v2 threshold variant); see
    docs/methods/dynamic.md for the algorithm and every choice."""

    config_cls = DynamicConfig
    config: DynamicConfig

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        self.pairs: list[tuple[str, str]] = []
        if config.variant == "gating":
            self.pairs = find_gated_pairs(spec.template, spec.input_shape, config.gate_shortcut)
            if not self.pairs:
                raise ConfigError(
                    "method.variant",
                    "gating",
                    "a model with Conv2d -> BatchNorm2d layers to gate (or variant=threshold)",
                )
        #: gated conv name -> (conv weight name, bn name) for building the sent masks
        self._mods = dict(spec.template.named_modules())

    # ------------------------------------------------------------------------------------ model
    def new_model(self) -> nn.Module:
        """The gated model (gating) or a plain copy (threshold)."""
        net = self.spec.build()
        if self.config.variant != "gating":
            return net
        with seeded_torch(self.experiment.seed, "dynamic", "gates"):
            return GatedModel(net, self.pairs, self.config.density, self.config.sigmoid_on_pool)

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """The model's initial params plus the freshly initialised predictors (``gates.*``)."""
        if self.config.variant != "gating":
            return ServerState(round=0, params=params)
        full = {k: v.detach().clone() for k, v in self.new_model().state_dict().items()}
        full.update(params)
        return ServerState(round=0, params=full)

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """Per-coordinate mean over the senders (gating); sample-weighted FedAvg (threshold)."""
        if self.config.variant != "gating":
            return super().aggregate(state, received)
        names = list(state.params)
        new = agg.per_coordinate([r.update for r in received], [r.num_examples for r in received], state.params, names)
        return ServerState(round=state.round + 1, params=new, mask=state.mask, extra=state.extra)

    @torch.no_grad()
    def inference_flops_per_sample(
        self, params: Mapping[str, Tensor], x: Tensor, batch_size: int = 512
    ) -> tuple[float, float]:
        """``(effective, dense)`` inference FLOPs per sample of the model ``params`` on ``x``.

        Effective: each gated conv's forward times its mean kept fraction over the samples of
        ``x``, plus the predictors' own FLOPs (``2 * C_in * C_out`` per gated layer); the
        threshold variant counts a conv's forward times its fraction of nonzero weights. Dense:
        the profile's dense forward (no predictors).
        """
        dense = float(self.profile.dense_forward())
        n = len(x)
        if n == 0:
            return dense, dense
        if self.config.variant != "gating":
            dens = {
                f"{name}.weight": LayerDensity(forward=float((params[f"{name}.weight"] != 0).float().mean()))
                for name, m in self._mods.items()
                if isinstance(m, nn.Conv2d) and f"{name}.weight" in self.profile
            }
            return inference_flops(self.profile, 1, dens).forward, dense
        model = self.new_model()
        assert isinstance(model, GatedModel)
        model.load_state_dict(dict(params), strict=True)
        model.eval()
        kept = {c: 0.0 for c, _ in self.pairs}
        for i in range(0, n, batch_size):
            xb = x[i : i + batch_size]
            model(xb)
            for c in kept:
                kept[c] += model.kept_fraction[c] * len(xb)
        dens = {f"{c}.weight": LayerDensity(forward=k / n) for c, k in kept.items() if f"{c}.weight" in self.profile}
        predictors = sum(2 * lin.in_features * lin.out_features for lin in model.gates.values())  # type: ignore[union-attr]
        return inference_flops(self.profile, 1, dens).forward + predictors, dense

    # ---------------------------------------------------------------------------------- client
    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Load the dense global model; forget the previous round's union."""
        model.load_state_dict(down.values, strict=True)
        return {k: v for k, v in client_state.items() if not k.startswith(_USED)}

    @property
    def why_not_batched(self) -> str | None:
        """Not batched: the gates record per step which channels each client used."""
        return (
            "dynamic: the channel gates record after every step which channels the client used "
            "(and the threshold variant zeroes channels per epoch), which is not described functionally"
        )

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks:
        """Gated SGD (gating) or epoch-wise threshold zeroing (threshold)."""
        if self.config.variant == "gating":
            assert isinstance(model, GatedModel)
            for c, _ in self.pairs:  # every gated channel starts unused this round
                out = self._mods[c].out_channels  # type: ignore[union-attr]
                client_state[_USED + c] = torch.zeros(int(out), dtype=torch.int64)  # type: ignore[arg-type]
            return DynamicHooks(model, self.profile, client_state, self.config.l1)
        spe = steps_per_epoch(ctx.num_examples, ctx.local.batch_size)
        return ThresholdHooks(model, self.profile, self.config.threshold, spe)

    def _uploaded_channels(self, counts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per gated conv, the bool ``(C_out,)`` channels an upload sends, from the number of
        samples that kept each channel this round.

        ``upload=used``: every channel kept for at least one sample (all that received gradient).
        ``upload=kept``: the :func:`keep_count` channels kept for the most samples (ties to the
        lower index), among those kept at least once: the channels this client's data selects.
        """
        out: dict[str, Tensor] = {}
        for conv, _ in self.pairs:
            c = counts[conv].to(torch.int64)
            used = c > 0
            if self.config.upload == "used" or len(c) == 0:
                out[conv] = used
                continue
            k = keep_count(self.config.density, len(c))
            # stable descending sort: equal counts keep channel order, so ties go to the lower index
            top = torch.sort(c, descending=True, stable=True).indices[:k]
            keep = torch.zeros_like(used).scatter_(0, top, True)
            out[conv] = keep & used
        return out

    def sent_masks(self, used: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The ``sent`` masks of an upload from the uploaded channels per gated conv (bool
        ``(C_out,)``): filters (and conv bias), BN weight/bias, predictor rows/bias."""
        sent: dict[str, Tensor] = {}
        for conv, bn in self.pairs:
            u = used[conv].to(torch.bool)
            g = f"{GATES}.{gate_key(conv)}"
            for name in (f"{conv}.weight", f"{conv}.bias", f"{bn}.weight", f"{bn}.bias", f"{g}.weight", f"{g}.bias"):
                if name in params:
                    shape = params[name].shape
                    sent[name] = u.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
        return sent

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Gating: the parameters of the channels :meth:`_uploaded_channels` selects, zero
        elsewhere; threshold: the weights, zeroed ones included (dense FedAvg, as the artifact)."""
        values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state = {k: v for k, v in client_state.items() if not k.startswith(_USED)}
        if self.config.variant != "gating":
            # dense: the lossless codecs already send a mostly-zero tensor as its nonzeros
            return Update(values=values), state
        counts = {c: client_state.get(_USED + c, torch.zeros(0, dtype=torch.int64)) for c, _ in self.pairs}
        sent = self.sent_masks(self._uploaded_channels(counts), values)
        for name, m in sent.items():
            values[name] = values[name] * m.to(values[name].dtype)
        return Update(values=values, sent=sent), state
