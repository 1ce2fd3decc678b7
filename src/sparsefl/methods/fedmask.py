"""FedMask: personalised binary {0, 1} supermasks over frozen weights, on HideNseek's frozen init.

FedMask (Li et al., SenSys 2021) keeps every weight of the local model frozen; each client learns
a real-valued score per weight whose threshold gives a binary mask (1 bit per parameter), and only
these masks travel between the server and the clients; each client's model is the frozen weights
times its own mask. It is one of the comparators HideNseek's abstract argues against ("a binary
supermask limits the model capacity"), so here it runs on exactly HideNseek's frozen
initialisation and SynFlow sparsity (the same seeds, so the same ``W0`` and mask), and differs
only in what clients learn: a keep/drop bit instead of a sign.

This module also holds what FedMask and FedPM (``sparsefl.methods.fedpm``) share: the frozen-init
options (taken from :class:`HideNseekConfig`, so names, defaults and bounds never drift), the
:class:`FrozenMaskMethod` base (HideNseek's init, setup payload and known mask; uploads of one bit
per kept weight) and the local hooks that train scores through a gate. Every choice where the
paper is silent is an option, listed in ``docs/methods/fedmask.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.methods.base import LocalHooks, Method
from sparsefl.methods.hidenseek import HideNseek, HideNseekConfig, effective_params
from sparsefl.models import ModelSpec
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.messages import KNOWN, ClientState, LocalContext, Received, ServerState, StateDict
from sparsefl.registry import METHODS

Tensor = torch.Tensor

#: HideNseek's options that fix the frozen weights and the SynFlow mask (shared verbatim).
FROZEN_INIT = (
    "sparsity", "synflow_iterations", "min_keep_fraction", "prune_first", "prune_classifier",
    "weight_init", "rescale", "train_bn",
)  # fmt: skip
_HNS_FIELDS = {f.name: f for f in dataclasses.fields(HideNseekConfig)}


def _as_hidenseek(name: str) -> Any:
    """HideNseek's field ``name``: the same default, help text and bounds."""
    f = _HNS_FIELDS[name]
    return dataclasses.field(default=f.default, metadata=f.metadata)


@dataclass(frozen=True)
class FrozenInitConfig(MethodConfig):
    """HideNseek's frozen-initialisation options (same names, defaults and bounds)."""

    sparsity: float = _as_hidenseek("sparsity")
    synflow_iterations: int = _as_hidenseek("synflow_iterations")
    min_keep_fraction: float = _as_hidenseek("min_keep_fraction")
    prune_first: bool = _as_hidenseek("prune_first")
    prune_classifier: bool = _as_hidenseek("prune_classifier")
    weight_init: Literal["kaiming_normal", "signed_constant", "model"] = _as_hidenseek("weight_init")
    rescale: bool = _as_hidenseek("rescale")
    train_bn: bool = _as_hidenseek("train_bn")


@dataclass(frozen=True)
class FedMaskConfig(FrozenInitConfig):
    """Options of FedMask (docs/methods/fedmask.md)."""

    score_init: float = opt(1.0, "initial |score|: +score_init where the mask starts at 1, - where at 0", gt=0)
    ste: Literal["sigmoid", "identity"] = opt(
        "sigmoid", "gradient of the threshold 1[sigmoid(s) > 0.5]: sigmoid'(s) (straight through sigmoid) or 1"
    )
    score_lr: float = opt(100.0, "learning rate of the scores at round 1 (follows local.lr's schedule)", gt=0)
    personalize: bool = opt(True, "clients keep their own scores across rounds (else restart from the global mask)")


# --------------------------------------------------------------------------------------------------
# Gates and local hooks (shared with FedPM)
# --------------------------------------------------------------------------------------------------


class ThresholdSTE(torch.autograd.Function):
    """``1[s > 0]`` (= ``1[sigmoid(s) > 0.5]``) forward; straight-through backward.

    ``forward(s, through_sigmoid)``: backward ``grad * sigmoid'(s)`` (the threshold's gradient
    taken as 1 with respect to ``sigmoid(s)``) or ``grad`` (identity)."""

    @staticmethod
    def forward(ctx: Any, s: Tensor, through_sigmoid: bool) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(s)
        ctx.through_sigmoid = through_sigmoid
        return (s > 0).to(s.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if not ctx.through_sigmoid:
            return grad, None
        (s,) = ctx.saved_tensors
        p = torch.sigmoid(s)
        return grad * p * (1 - p), None


#: A gate: the kept positions' scores -> their mask values (differentiable in the scores).
Gate = Callable[[Tensor], Tensor]


class GatedWeightHooks(LocalHooks):
    """Local training of mask scores: the forward runs the model functionally with
    ``W_eff = W0 * gate(s)`` on the kept positions (0 elsewhere); only the scores (and, with
    ``train_bn``, the trained tensors) are optimised. :meth:`close` restores the
    ``requires_grad`` flags and writes the trained scores into ``state`` as ``score/{name}``
    (full shape; pruned positions keep their initial, unused values).

    Parameters
    ----------
    model:
        The client's model, holding ``W0`` (already masked) in its scope weights.
    scores:
        Initial scores per scope name (full shape; copied).
    masks:
        The kept positions per scope name (the known SynFlow mask).
    gate:
        Maps a 1-D tensor of kept scores to their mask values.
    grad_scale:
        ``score_lr / local.lr``: SGD is linear in the gradient, so this is a per-tensor rate.
    """

    def __init__(
        self,
        model: nn.Module,
        profile: ModelProfile,
        trained: Sequence[str],
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        gate: Gate,
        grad_scale: float,
        densities: Mapping[str, LayerDensity],
        state: ClientState,
    ) -> None:
        super().__init__(model, profile)
        self.gate, self.grad_scale, self.state = gate, grad_scale, state
        self._densities = dict(densities)
        named = dict(model.named_parameters())
        self._full = {k: v.detach().clone() for k, v in scores.items()}
        self._flat = {k: torch.nonzero(masks[k].reshape(-1)).flatten() for k in self._full}
        self._w0 = {k: named[k].detach().reshape(-1).index_select(0, f).clone() for k, f in self._flat.items()}
        self.scores = {
            k: nn.Parameter(s.reshape(-1).index_select(0, self._flat[k]).clone()) for k, s in self._full.items()
        }
        self._before = {n: p.requires_grad for n, p in named.items()}
        for n, p in named.items():
            p.requires_grad_(n in trained)
        self._trained = [named[n] for n in trained]

    def parameters(self) -> list[nn.Parameter]:
        return [*self.scores.values(), *self._trained]

    def forward(self, x: Tensor) -> Tensor:
        weights = {}
        for k, s in self.scores.items():
            full = self._full[k]
            vals = self._w0[k] * self.gate(s)
            weights[k] = (
                torch.zeros(full.numel(), dtype=vals.dtype, device=vals.device)
                .index_copy(0, self._flat[k], vals)
                .view(full.shape)
            )
        return functional_call(self.model, weights, (x,))

    def after_backward(self, step: int) -> None:
        if self.grad_scale != 1.0:
            for s in self.scores.values():
                if s.grad is not None:
                    s.grad.mul_(self.grad_scale)

    def densities(self) -> Mapping[str, LayerDensity]:
        return self._densities

    def close(self) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._before[n])
        for k, s in self.scores.items():
            full = self._full[k].clone()
            full.view(-1).index_copy_(0, self._flat[k], s.detach())
            self.state[f"score/{k}"] = full


# --------------------------------------------------------------------------------------------------
# The shared base
# --------------------------------------------------------------------------------------------------


def bits_to_signs(bits: Tensor, kept: Tensor) -> Tensor:
    """A {0, 1} mask as ``+1`` / ``-1`` on the kept positions and 0 elsewhere: the form the
    ``auto`` and ``sign`` codecs send at one bit per kept weight (the kept set is known)."""
    return torch.where(bits.bool(), 1.0, -1.0) * kept.to(torch.float32)


def signs_to_bits(values: Tensor) -> Tensor:
    """The {0, 1} mask (float32) a :func:`bits_to_signs` tensor carries (unsent positions: 0)."""
    return (values > 0).to(torch.float32)


class FrozenMaskMethod(Method):
    """Base of the binary-supermask methods on HideNseek's frozen init (FedMask, FedPM).

    Server: HideNseek's ``init_state`` (random ``W0``, SynFlow to ``sparsity``, frozen), its setup
    payload and known mask; the mask over the kept weights is the only thing learned. Client: the
    frozen tensors are kept from the setup payload; scores are trained through the subclass's
    gate (:class:`GatedWeightHooks`); the upload is one {0, 1} bit per kept weight (as +-1, so
    the codecs send exactly one bit each) plus the per-round BatchNorm tensors.
    """

    config: FrozenInitConfig
    #: rng purpose prefix of the subclass
    tag = "frozen_mask"

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        hcfg = HideNseekConfig(name="hidenseek", **{n: getattr(config, n) for n in FROZEN_INIT})
        self.frozen = HideNseek(hcfg, experiment, spec, profile)
        self.roles = self.frozen.roles

    # ------------------------------------------------------------------ subclass parts
    def _init_extra(self, state: ServerState) -> StateDict:
        """Method-owned server tensors before round 1."""
        raise NotImplementedError

    def _down_values(self, state: ServerState) -> StateDict:
        """The scope tensors of the downlink (kept positions only are sent)."""
        raise NotImplementedError

    def _global_mask(self, state: ServerState) -> StateDict:
        """The {0, 1} mask (float32) of the global model, per scope name."""
        raise NotImplementedError

    def _initial_scores(self, client_state: ClientState, ctx: LocalContext) -> StateDict:
        """The client's scores at the start of local training (full shape)."""
        raise NotImplementedError

    def _gate(self, ctx: LocalContext) -> Gate:
        """The gate of this round's local training."""
        raise NotImplementedError

    def _upload_bits(self, client_state: ClientState, ctx: LocalContext) -> StateDict:
        """The {0, 1} mask the client sends, per scope name (full shape)."""
        raise NotImplementedError

    def _aggregate_masks(self, state: ServerState, received: Sequence[Received]) -> StateDict:
        """The new ``extra`` from the round's {0, 1} uploads (``self._bits_of``)."""
        raise NotImplementedError

    def _personal_mask(self, client_state: ClientState) -> StateDict:
        """The {0, 1} mask of the client's own model after local training."""
        raise NotImplementedError

    # ------------------------------------------------------------------ server
    def _mask(self, state: ServerState) -> dict[str, Tensor]:
        if state.mask is None:
            raise ValueError(f"{self.tag}: the server state has no mask (init_state was not run)")
        return {k: state.mask[k] for k in self.roles.scope}

    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """HideNseek's frozen ``W0 = M * W_init`` and SynFlow mask ``M``; the method's own tensors."""
        hs = self.frozen.init_state(params, proxy)
        st = ServerState(round=0, params=hs.params, mask=hs.mask)
        return ServerState(round=0, params=st.params, mask=st.mask, extra=self._init_extra(st))

    def setup_payload(self, state: ServerState) -> Update | None:
        """HideNseek's: the frozen tensors once per client, with ``M`` as the sent mask."""
        return self.frozen.setup_payload(state)

    def known_masks(self, setup: Update) -> dict[str, Tensor]:
        """``M`` per scope weight: later scope tensors travel without their mask."""
        return self.frozen.known_masks(setup)

    def broadcast(self, state: ServerState) -> Update:
        """The subclass's scope tensors on the kept positions (known mask ``M``, so no mask is
        sent) and the per-round tensors."""
        mask = self._mask(state)
        values = {k: v * mask[k].to(v.dtype) for k, v in self._down_values(state).items()}
        values.update({k: state.params[k] for k in self.roles.per_round})
        return Update(values=values, sent=mask)

    def _bits_of(self, state: ServerState, r: Received, k: str) -> Tensor | None:
        """Client ``r``'s {0, 1} upload of scope weight ``k`` on the kept positions (None if absent)."""
        v = r.update.values.get(k)
        return None if v is None else signs_to_bits(v) * self._mask(state)[k].to(torch.float32)

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """The subclass's mask rule; FedAvg on the per-round tensors; frozen tensors untouched."""
        extra = self._aggregate_masks(state, received)
        params = dict(state.params)
        if self.roles.per_round and received:
            params.update(
                agg.weighted_mean(
                    [r.update for r in received], [r.num_examples for r in received], self.roles.per_round
                )
            )
        return ServerState(round=state.round + 1, params=params, mask=state.mask, extra=extra)

    def update_norm(self, state: ServerState, received: Received) -> float:
        """Fraction of the kept weights whose bit differs from the global mask."""
        mask, g = self._mask(state), self._global_mask(state)
        diff = kept = 0
        for k, m in mask.items():
            kept += int(m.sum())
            b = self._bits_of(state, received, k)
            if b is not None:
                diff += int(((b != g[k]) & m).sum())
        return diff / kept if kept else 0.0

    def eval_params(self, state: ServerState) -> StateDict:
        """The global model ``M * W0 * mask``."""
        return effective_params(state.params, self._global_mask(state))

    # ------------------------------------------------------------------ client
    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Keep the setup's frozen tensors (``frozen/{name}``), load them and the per-round tensors
        into ``model``; keep the downlink's scope tensors as ``down/{name}``."""
        names = self.roles.scope + self.roles.frozen
        if setup is not None:
            client_state = {**client_state, **{f"frozen/{k}": setup.values[k] for k in names}}
        missing = [k for k in names if f"frozen/{k}" not in client_state]
        if missing:
            raise ValueError(f"{self.tag}: the client never received the frozen tensors (e.g. {missing[0]!r})")
        values = {k: client_state[f"frozen/{k}"] for k in names}
        values.update({k: down.values[k] for k in self.roles.per_round})
        model.load_state_dict(values, strict=True)
        return {**client_state, **{f"down/{k}": down.values[k] for k in self.roles.scope}}

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> GatedWeightHooks:
        masks = {k: client_state[f"{KNOWN}{k}"] for k in self.roles.scope}
        dens = {}
        for k in self.roles.scope:
            if k in self.profile:
                d = float(masks[k].float().mean())
                dens[k] = LayerDensity(forward=d, grad_input=d, grad_weight=d)
        return GatedWeightHooks(
            model,
            self.profile,
            self.roles.trained,
            self._initial_scores(client_state, ctx),
            masks,
            self._gate(ctx),
            self.config.score_lr / self.experiment.local.lr,  # type: ignore[attr-defined]
            dens,
            client_state,
        )

    def personal_params(self, model: nn.Module, client_state: ClientState) -> StateDict:
        """The client's own model ``M * W0 * its mask`` after local training."""
        return effective_params(model.state_dict(), self._personal_mask(client_state))

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """The {0, 1} mask as +-1 on the kept positions (sent = the known mask: one bit each) and
        the per-round tensors."""
        bits = self._upload_bits(client_state, ctx)
        values: StateDict = {}
        sent: dict[str, Tensor] = {}
        for k in self.roles.scope:
            sent[k] = client_state[f"{KNOWN}{k}"]
            values[k] = bits_to_signs(bits[k], sent[k])
        sd = model.state_dict()
        values.update({k: sd[k].detach().clone() for k in self.roles.per_round})
        state = {k: v for k, v in client_state.items() if not k.startswith("down/")}
        return Update(values=values, sent=sent), state


# --------------------------------------------------------------------------------------------------
# FedMask
# --------------------------------------------------------------------------------------------------


@METHODS.register(
    "fedmask",
    FedMaskConfig,
    summary="FedMask (Li et al. 2021): personalised {0,1} masks over frozen weights, on HideNseek's init",
)
class FedMask(FrozenMaskMethod):
    """FedMask (Li et al., SenSys 2021): personalised binary supermasks over frozen weights.

    https://doi.org/10.1145/3485730.3485929 . Each client learns scores ``s`` whose threshold
    ``1[sigmoid(s) > 0.5]`` is its {0, 1} mask over the frozen kept weights (straight-through
    gradient), keeps them across rounds (personalised) and uploads its mask, one bit per kept
    weight; the server's global mask is the sample-weighted majority of the uploaded masks (a tie
    keeps the previous bit) and goes down at one bit per kept weight.

    Parameters
    ----------
    config:
        A :class:`FedMaskConfig` (the frozen-init options are HideNseek's).
    experiment, spec, profile:
        As for every :class:`~sparsefl.methods.Method`.
    """

    config_cls = FedMaskConfig
    config: FedMaskConfig
    tag = "fedmask"

    def _init_extra(self, state: ServerState) -> StateDict:
        """The global mask starts all ones: the global model starts as ``W0``."""
        return {f"gmask/{k}": torch.ones_like(state.params[k]) for k in self.roles.scope}

    def _global_mask(self, state: ServerState) -> StateDict:
        return {k: state.extra[f"gmask/{k}"] for k in self.roles.scope}

    def _down_values(self, state: ServerState) -> StateDict:
        mask = self._mask(state)
        return {k: bits_to_signs(g, mask[k]) for k, g in self._global_mask(state).items()}

    def _aggregate_masks(self, state: ServerState, received: Sequence[Received]) -> StateDict:
        """Sample-weighted majority of the {0, 1} uploads: 1 where more than half the weight
        says 1, 0 where less, the previous bit on a tie (sums in int64, so ties are exact)."""
        extra = dict(state.extra)
        for k, prev in self._global_mask(state).items():
            ones = total = 0
            for r in received:
                b = self._bits_of(state, r, k)
                if b is not None:
                    ones = ones + b.to(torch.int64) * int(r.num_examples)
                    total += int(r.num_examples)
            if total:
                v = 2 * torch.as_tensor(ones) - total  # > 0: majority says 1
                extra[f"gmask/{k}"] = torch.where(v > 0, 1.0, torch.where(v < 0, 0.0, prev)).to(prev.dtype)
        return extra

    def _initial_scores(self, client_state: ClientState, ctx: LocalContext) -> StateDict:
        """The client's own scores (``personalize``, from its second participation on), else
        ``+-score_init`` from the global mask."""
        out = {}
        for k in self.roles.scope:
            own = client_state.get(f"score/{k}")
            if self.config.personalize and own is not None:
                out[k] = own.clone()
            else:
                g = signs_to_bits(client_state[f"down/{k}"])
                out[k] = torch.where(g > 0, 1.0, -1.0) * self.config.score_init
        return out

    def _gate(self, ctx: LocalContext) -> Gate:
        through = self.config.ste == "sigmoid"
        return lambda s: ThresholdSTE.apply(s, through)

    def _upload_bits(self, client_state: ClientState, ctx: LocalContext) -> StateDict:
        return {k: (client_state[f"score/{k}"] > 0).to(torch.float32) for k in self.roles.scope}

    def _personal_mask(self, client_state: ClientState) -> StateDict:
        return {
            k: (client_state[f"score/{k}"] > 0).to(torch.float32)
            for k in self.roles.scope
            if f"score/{k}" in client_state
        }


__all__ = [
    "FROZEN_INIT",
    "FedMask",
    "FedMaskConfig",
    "FrozenInitConfig",
    "FrozenMaskMethod",
    "GatedWeightHooks",
    "ThresholdSTE",
    "bits_to_signs",
    "signs_to_bits",
]
