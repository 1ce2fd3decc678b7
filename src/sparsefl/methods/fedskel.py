"""FedSkel: federated training of per-client skeleton channels (Luo et al., CIKM 2021).

Each client picks a skeleton: per convolution, the output channels whose feature maps had the
largest accumulated L1 norm over a short full-backprop SetSkel phase. Afterwards (UpdateSkel)
the backward runs only through the skeleton, the client uploads only its skeleton filters, the
server averages each filter over the clients that sent it, and a client takes the server's
values for its skeleton filters only, keeping its other filters (personalisation).

A client re-selects its skeleton every round it takes part (``reselect_every=1``), on the full
model the server then sends it; and it samples the skeleton in proportion to importance
(``selection=sample``) rather than taking the top channels, since every client ranks the channels
alike and a fixed top set would leave most filters untrained for good. Reference code:
BUAA-CI-LAB/FedSkel. Options (``skeleton_ratio`` or ``tiers``, ``setskel_steps``,
``reselect_every``, ``selection``, ``aggregation``, ``skeleton_linear``) and every choice where
the paper is silent: ``docs/methods/fedskel.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update
from sparsefl.config import MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.kernels.skeleton import CompactSkeleton
from sparsefl.methods.base import LocalHooks, Method
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.messages import ClientState, LocalContext, Received, ServerState
from sparsefl.registry import METHODS
from sparsefl.rng import np_rng, torch_gen

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm
# without re-selection 1 - ratio of a client's filters keep their first-round values for good,
# which collapses deep models (docs/methods/fedskel.md, "Re-selection")
RESELECT_EVERY = 1


@dataclass(frozen=True)
class FedSkelConfig(MethodConfig):
    """Options of FedSkel (docs/methods)."""

    skeleton_ratio: float = opt(
        0.25, "fraction of each conv layer's output channels in a client's skeleton", gt=0, le=1
    )
    tiers: tuple[float, ...] = opt(
        (),
        "per-client skeleton ratios (device tiers), assigned by a seeded balanced rule; empty = skeleton_ratio",
        gt=0,
        le=1,
    )
    setskel_steps: int = opt(5, "local steps of full backprop that accumulate the channel importance", ge=1)
    reselect_every: int = opt(
        RESELECT_EVERY,
        "re-select a client's skeleton once k rounds have passed since it selected (0 = never); with "
        "per_filter the server then sends that client the full model",
        ge=0,
    )
    aggregation: Literal["per_filter", "mean_full"] = opt(
        "per_filter", "per_filter: average each filter over its senders; mean_full: reference's mean of full models"
    )
    bn: Literal["train", "skeleton"] = opt(
        "train", "BatchNorm after a conv: train all channels (reference, default) or only skeleton channels"
    )
    skeleton_linear: bool = opt(False, "also skeletonise hidden linear layers by output feature (departure)")
    selection: Literal["top", "sample"] = opt(
        "sample",
        "sample: channels sampled in proportion to importance, seeded per client and round (a departure); "
        "top: the most important channels (the reference)",
    )
    backward: Literal["compact", "mask"] = opt(
        "compact",
        "skeleton backward: compact (gathered-channel kernels, sparsefl.kernels.skeleton) or mask (the "
        "masked dense gradient, the reference); same model up to float summation order",
    )

    def __post_init__(self) -> None:
        if self.sparsity != 0:
            raise ConfigError("method.sparsity", self.sparsity, "0 for fedskel (it prunes no weights)")


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------


def skeleton_size(channels: int, ratio: float) -> int:
    """Channels kept of ``channels`` at skeleton ratio ``ratio``: ``max(1, floor(ratio*C + 0.5))``."""
    return max(1, min(channels, int(math.floor(ratio * channels + 0.5))))


def select_skeleton(importance: torch.Tensor, ratio: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask over channels: the ``skeleton_size`` channels with the largest importance.

    Ties go to the lower channel index (stable sort), so the choice is deterministic. With
    ``gen``, the channels are sampled without replacement with probability proportional to their
    importance instead (Gumbel top-k on ``log importance``), so that clients whose activations
    rank the channels alike still pick different skeletons.
    """
    k = skeleton_size(importance.numel(), ratio)
    key = importance.detach().to(torch.float64).cpu()
    if gen is not None:
        u = torch.rand(key.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        key = torch.log(key.clamp_min(1e-300)) - torch.log(-torch.log(u))  # log p + Gumbel(0, 1)
    order = torch.sort(key, descending=True, stable=True).indices
    mask = torch.zeros(importance.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def channel_importance(y: torch.Tensor, linear: bool = False) -> torch.Tensor:
    """``sum over every dim but the channel dim of |y|`` (channel dim 1 for conv, last for linear)."""
    dim = y.dim() - 1 if linear else 1
    dims = [d for d in range(y.dim()) if d != dim]
    return y.detach().abs().sum(dim=dims, dtype=torch.float64) if dims else y.detach().abs().to(torch.float64)


def assign_tiers(seed: int, num_clients: int, tiers: tuple[float, ...]) -> list[float]:
    """Skeleton ratio of every client: ``tiers[p(c) mod len(tiers)]`` for a seeded permutation ``p``.

    Balanced (each tier gets ``num_clients / len(tiers)`` clients, up to one) and a pure function
    of ``(seed, num_clients, tiers)``.
    """
    perm = np_rng(seed, "fedskel", "tiers").permutation(num_clients)
    pos = [0] * num_clients
    for p, c in enumerate(perm):
        pos[int(c)] = p
    return [tiers[pos[c] % len(tiers)] for c in range(num_clients)]


def rows_mask(channels: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Expand a channel mask (dim 0) to a full-shape bool mask of a tensor of ``shape``."""
    return channels.view(-1, *([1] * (len(shape) - 1))).expand(*shape).clone()


@dataclass(frozen=True)
class SkelLayer:
    """One skeletonised layer: its weight name, module name, whether linear, and the tensors that
    belong to each of its output channels (``personal``: sent for skeleton rows only and kept
    personal otherwise; ``frozen``: only its skeleton rows are updated during skeleton-only steps)."""

    name: str
    module: str
    linear: bool
    bn_module: str | None
    personal: tuple[str, ...]
    frozen: tuple[str, ...]


def skeleton_layers(model: nn.Module, skeleton_linear: bool, bn_mode: str) -> list[SkelLayer]:
    """The skeletonised layers of ``model`` in registration (forward) order.

    A conv's BatchNorm is the next BatchNorm module registered after it with ``num_features ==
    out_channels`` and no other conv/linear in between (the convention every model here follows).
    """
    mods = list(model.named_modules())
    linears = [n for n, m in mods if isinstance(m, nn.Linear)]
    out: list[SkelLayer] = []
    for i, (name, mod) in enumerate(mods):
        is_conv = isinstance(mod, _CONV)
        is_lin = isinstance(mod, nn.Linear) and skeleton_linear and name != linears[-1]
        if not (is_conv or is_lin):
            continue
        bn_name = None
        for n2, m2 in mods[i + 1 :]:
            if isinstance(m2, (*_CONV, nn.Linear)):
                break
            if isinstance(m2, _BN) and m2.num_features == (mod.out_channels if is_conv else mod.out_features):
                bn_name = n2
                break
        prefix = f"{name}." if name else ""
        personal = [f"{prefix}weight"]
        frozen = [f"{prefix}weight"] + ([f"{prefix}bias"] if getattr(mod, "bias", None) is not None else [])
        if bn_mode == "skeleton" and bn_name is not None:
            bn_mod = dict(mods)[bn_name]
            affine = [f"{bn_name}.weight", f"{bn_name}.bias"] if bn_mod.affine else []
            personal += affine
            frozen += affine
        out.append(SkelLayer(f"{prefix}weight", name, not is_conv, bn_name, tuple(personal), tuple(frozen)))
    return out


# ------------------------------------------------------------------------------------------------
# Local hooks
# ------------------------------------------------------------------------------------------------


class SkeletonHooks(LocalHooks):
    """SetSkel then UpdateSkel around the local training loop.

    ``skeleton`` is the client's current skeleton (weight name -> bool channel mask) or None to
    run a SetSkel phase of ``setskel_steps`` full-backprop steps first. The chosen skeleton is
    written into ``client_state`` (this round's copy, made by :meth:`FedSkel.receive`) so that
    :meth:`FedSkel.upload` sees it; a round shorter than the SetSkel phase selects in
    :meth:`close`.
    """

    def __init__(
        self,
        model: nn.Module,
        profile: ModelProfile,
        layers: list[SkelLayer],
        ratio: float,
        skeleton: dict[str, torch.Tensor] | None,
        setskel_steps: int,
        client_state: ClientState | None = None,
        round: int = 0,
        mask_bn_output: bool = False,
        backward: str = "mask",
        gen: torch.Generator | None = None,
    ) -> None:
        super().__init__(model, profile)
        self.layers = layers
        self.ratio = ratio
        self.setskel_steps = setskel_steps
        self.client_state = client_state
        self.round = round
        self.gen = gen
        self.skeleton: dict[str, torch.Tensor] | None = None
        self.importance: dict[str, torch.Tensor] = {}
        self._masked_step = False
        self._rows: dict[torch.Tensor, torch.Tensor] = {}
        self._tensors = dict(model.named_parameters())
        mods = dict(model.named_modules())
        self._handles: list[RemovableHandle] = []
        # compact backward: the kernels replace the output-gradient hook of the layers they cover
        # the compact kernels hand the skeleton rows' weight gradients over here, not as full
        # zero-filled gradients; the optimiser reads them (row_grads), after_step clears them
        self._row_grads: dict[torch.Tensor, torch.Tensor] = {}
        self._compact = CompactSkeleton(model, [(la.name, la.module, la.bn_module) for la in layers], self._row_grads)
        self._compact_on = backward == "compact"
        for layer in layers:
            self._handles.append(mods[layer.module].register_forward_hook(self._make_hook(layer)))
            if mask_bn_output and layer.bn_module is not None:
                self._handles.append(mods[layer.bn_module].register_forward_hook(self._make_hook(layer, bn=True)))
        if skeleton is not None:
            self._activate(skeleton)

    # -- hooks on the model
    def _make_hook(self, layer: SkelLayer, bn: bool = False):  # type: ignore[no-untyped-def]
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if self.skeleton is None:
                if not bn and mod.training and torch.is_grad_enabled():
                    imp = channel_importance(out, layer.linear)
                    prev = self.importance.get(layer.name)
                    self.importance[layer.name] = imp if prev is None else prev + imp
                return
            if out.requires_grad and not (not bn and self._compact.active(layer.name)):
                keep = self._views[(layer.name, out.dim(), layer.linear and not bn)]
                out.register_hook(lambda g, keep=keep: g.masked_fill(~keep, 0))

        return hook

    def _activate(self, skeleton: dict[str, torch.Tensor]) -> None:
        """Start skeleton-only backprop: from now on the optimiser updates skeleton rows only."""
        device = next(self.model.parameters()).device  # skeletons are chosen on the CPU
        self.skeleton = {k: v.to(device).clone() for k, v in skeleton.items()}
        self._views: dict[tuple[str, int, bool], torch.Tensor] = {}
        for layer in self.layers:
            ch = self.skeleton[layer.name]
            for nd in (2, 3, 4, 5):
                # the channel dim is 1 for conv and BN outputs, the last dim for linear outputs
                self._views[(layer.name, nd, False)] = ch.view(1, -1, *([1] * (nd - 2)))
                self._views[(layer.name, nd, True)] = ch.view(*([1] * (nd - 1)), -1)
            rows = ch.nonzero().flatten()
            for t in layer.frozen:
                self._rows[self._tensors[t]] = rows
        if self._compact_on:
            self._compact.install(self.skeleton)
        if self.client_state is not None:
            for layer in self.layers:
                self.client_state[f"skel/{layer.name}"] = self.skeleton[layer.name].clone()
            self.client_state["skel_round"] = torch.tensor(self.round, dtype=torch.int64)

    def _select(self) -> None:
        skel = {}
        for layer in self.layers:
            imp = self.importance.get(layer.name)
            if imp is None:  # no training step saw this layer: rank all channels equal
                w = self._tensors[layer.name]
                imp = torch.zeros(w.shape[0], dtype=torch.float64)
            skel[layer.name] = select_skeleton(imp, self.ratio, self.gen)
        self._activate(skel)

    # -- LocalHooks interface
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._masked_step = self.skeleton is not None
        return self.model(x)

    def after_step(self, step: int) -> None:
        self._row_grads.clear()
        if self.skeleton is None and step + 1 >= self.setskel_steps:
            self._select()

    def update_rows(self) -> Mapping[torch.Tensor, torch.Tensor]:
        return self._rows

    def row_grads(self) -> Mapping[torch.Tensor, torch.Tensor]:
        return self._row_grads

    def densities(self) -> Mapping[str, LayerDensity]:
        if not self._masked_step or self.skeleton is None:
            return {}
        out = {}
        for layer in self.layers:
            if layer.name in self.profile:
                f = float(self.skeleton[layer.name].float().mean())
                out[layer.name] = LayerDensity(forward=1.0, grad_input=f, grad_weight=f)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._compact.remove()
        if self.skeleton is None:
            self._select()


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


@METHODS.register("fedskel", FedSkelConfig, summary="FedSkel (Luo et al. 2021): per-client skeleton channels")
class FedSkel(Method):
    """FedSkel (Luo et al., CIKM 2021): skeleton-only backprop, upload and personalised download.

    See docs/methods/fedskel.md for the algorithm and every choice made.
    """

    config_cls = FedSkelConfig
    config: FedSkelConfig

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        c = self.config
        self.layers = skeleton_layers(self.spec.build(), c.skeleton_linear, c.bn)
        self._tier_ratios = (
            assign_tiers(self.experiment.seed, self.experiment.federation.num_clients, c.tiers) if c.tiers else None
        )

    def ratio(self, client_id: int) -> float:
        """Skeleton ratio of ``client_id``: its tier's, or ``method.skeleton_ratio``."""
        if self._tier_ratios is not None and 0 <= client_id < len(self._tier_ratios):
            return self._tier_ratios[client_id]
        return self.config.skeleton_ratio

    # ---------------------------------------------------------------------------------- server
    def _reselects(self, state: ServerState, client_id: int) -> bool:
        """Whether ``client_id`` selects a new skeleton in the round after ``state`` (``per_filter``):
        the server does not know its skeleton yet, or ``reselect_every`` rounds have passed since
        it selected. Such a client is sent the full model (the reference's SetSkel phase runs on it)."""
        if any(f"skel/{client_id}/{layer.name}" not in state.extra for layer in self.layers):
            return True
        every = self.config.reselect_every
        if every == 0:
            return False
        since = state.extra.get(f"skel_round/{client_id}")
        return since is None or state.round + 1 - int(since) >= every

    def downlink(self, state: ServerState, client_id: int) -> Update | None:
        """The broadcast (full model) when the client selects a skeleton this round
        (:meth:`_reselects`), else its skeleton rows of every personalised tensor plus the dense
        rest (``per_filter`` only)."""
        if self.config.aggregation != "per_filter" or self._reselects(state, client_id):
            return None
        sent = {}
        for layer in self.layers:
            ch = state.extra.get(f"skel/{client_id}/{layer.name}")
            if ch is None:
                return None
            for t in layer.personal:
                sent[t] = rows_mask(ch, state.params[t].shape)
        return Update(values=state.params, sent=sent)

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """``per_filter``: per-coordinate mean over senders; ``mean_full``: unweighted mean of
        full models. Records each sender's skeleton (from its sent masks) in ``extra``, and the
        round it was selected in when it was new this round."""
        names = list(state.params)
        ups = [r.update for r in received]
        if self.config.aggregation == "mean_full":
            new = agg.weighted_mean(ups, [1] * len(ups), names)
            return ServerState(state.round + 1, new, state.mask, state.extra)
        new = agg.per_coordinate(ups, [r.num_examples for r in received], state.params, names)
        extra = dict(state.extra)
        for r in received:
            if self._reselects(state, r.client_id):
                extra[f"skel_round/{r.client_id}"] = torch.tensor(state.round + 1, dtype=torch.int64)
            for layer in self.layers:
                s = r.update.sent.get(layer.name)
                if s is not None:
                    extra[f"skel/{r.client_id}/{layer.name}"] = s.reshape(s.shape[0], -1).any(dim=1)
        return ServerState(state.round + 1, new, state.mask, extra)

    # ---------------------------------------------------------------------------------- client
    def _skeleton(self, client_state: ClientState) -> dict[str, torch.Tensor] | None:
        keys = [f"skel/{layer.name}" for layer in self.layers]
        if not all(k in client_state for k in keys):
            return None
        return {layer.name: client_state[f"skel/{layer.name}"].bool() for layer in self.layers}

    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Load the downlink; for a client with a skeleton, take the server's values for its
        skeleton rows only and keep its own values elsewhere (the reference's
        ``update_skel_weight``). With ``per_filter``, a full model in place of skeleton rows means
        the server asks for a new skeleton: the client takes every value and forgets its skeleton,
        so :meth:`hooks` runs SetSkel. Returns a fresh copy of the state for this round."""
        state = dict(client_state)
        values = dict(down.values)
        skel = self._skeleton(state)
        if skel is not None and self.config.aggregation == "per_filter":
            if not any(t in down.sent for layer in self.layers for t in layer.personal):
                for layer in self.layers:
                    state.pop(f"skel/{layer.name}", None)
                state.pop("skel_round", None)
                skel = None
        if skel is not None:
            for layer in self.layers:
                ch = skel[layer.name]
                for t in layer.personal:
                    own = state.get(f"w/{t}")
                    if own is None:
                        raise ValueError(f"fedskel: client state has a skeleton but no personal copy of {t!r}")
                    values[t] = torch.where(rows_mask(ch, own.shape), values[t], own)
        model.load_state_dict(values, strict=True)
        return state

    @property
    def why_not_batched(self) -> str | None:
        """Not batched: the skeleton is chosen during training and restricts the update to rows."""
        return (
            "fedskel: the skeleton is chosen from activations during training and restricts the "
            "optimiser to its rows, which the batched executor does not describe"
        )

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks:
        """SetSkel at the first participation or when re-selection is due, else skeleton-only
        (``per_filter``: the server decided, see :meth:`receive`; ``mean_full``: the client's clock)."""
        skel = self._skeleton(client_state)
        every = self.config.reselect_every
        mean_full = self.config.aggregation == "mean_full"
        if mean_full and skel is not None and every > 0 and "skel_round" in client_state:
            if ctx.round - int(client_state["skel_round"]) >= every:
                skel = None
        return SkeletonHooks(
            model,
            self.profile,
            self.layers,
            self.ratio(ctx.client_id),
            skel,
            self.config.setskel_steps,
            client_state,
            ctx.round,
            mask_bn_output=self.config.bn == "skeleton",
            backward=self.config.backward,
            gen=torch_gen(ctx.seed, "fedskel", "select", ctx.client_id, ctx.round)
            if self.config.selection == "sample"
            else None,
        )

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Skeleton rows of each personalised tensor (sent masks) plus the dense rest; keep the
        client's own copy of every personalised tensor in its state."""
        values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state = dict(client_state)
        skel = self._skeleton(state)
        if skel is None:  # cannot happen: the hooks select at the latest in close()
            raise RuntimeError("fedskel: no skeleton after local training")
        sent = {}
        for layer in self.layers:
            for t in layer.personal:
                state[f"w/{t}"] = values[t].clone()
                sent[t] = rows_mask(skel[layer.name], values[t].shape)
        if self.config.aggregation == "mean_full":
            sent = {}
        return Update(values=values, sent=sent), state


def personal_tensors(method: FedSkel) -> list[str]:
    """Names of every tensor FedSkel sends for skeleton rows only (for tests and reports)."""
    return [t for layer in method.layers for t in layer.personal]


__all__ = [
    "FedSkel",
    "FedSkelConfig",
    "SkeletonHooks",
    "assign_tiers",
    "channel_importance",
    "select_skeleton",
    "skeleton_layers",
    "skeleton_size",
]
