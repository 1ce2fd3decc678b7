"""FedDST: federated dynamic sparse training at a fixed density (Bibikar et al., AAAI 2022).

The global model is sparse from round 1 (an ERK or uniform layer-wise mask); clients train only
its kept weights. Every ``delta_r`` rounds until ``r_end`` of the run, each client ends its local
training with a RigL step (:func:`sparsefl.pruning.dst.rigl_step`): per layer it drops the
``alpha_t`` share of its kept weights of smallest magnitude and regrows as many removed weights of
largest dense-gradient magnitude (zero-initialised), with RigL's cosine-annealed ``alpha_t``. It
uploads its kept values and its own mask. The server averages each weight over the clients that
kept it (sample-weighted), and the new global mask is the magnitude consensus of that aggregate:
per layer the layer's fixed count of largest-magnitude weights among those some client kept.

Bytes: kept values only on both links, with the mask as the update's ``sent`` set. The global
mask travels in the setup payload, again to each client whose copy is older than the current one,
and is known on both sides afterwards (a 4-byte fingerprint per tensor); a client's readjusted
mask differs from it and is encoded in full on its uplink. Options and every choice: ``docs/methods/feddst.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sparsefl.accounting import ModelProfile
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.masks import Mask, default_scope
from sparsefl.methods.base import LocalHooks, Method, mask_setup, schedule_end, setup_masks
from sparsefl.methods.static_mask import StaticMaskHooks, consensus_aggregate
from sparsefl.models import ModelSpec
from sparsefl.protocol.messages import (
    ClientData,
    ClientState,
    LocalContext,
    Received,
    ServerState,
    StateDict,
    TaskConfig,
)
from sparsefl.pruning import allocate, cosine_fraction, rigl_step
from sparsefl.pruning.dst import dense_grads
from sparsefl.registry import METHODS
from sparsefl.rng import torch_gen

Tensor = torch.Tensor

# Client-state keys (ClientState is a flat dict of tensors); all are dropped by upload.
_MASK = "feddst.mask."  # + weight name: this round's mask
_BX, _BY = "feddst.batch.x", "feddst.batch.y"  # the batch the readjusting gradient is taken on


@dataclass(frozen=True)
class FedDSTConfig(MethodConfig):
    """Options of FedDST (docs/methods/feddst.md)."""

    sparsity: float = opt(0.8, "fraction of the scope's weights removed, fixed through training", ge=0, lt=1)
    mask_init: Literal["erk", "uniform"] = opt("erk", "layer densities of the mask: erk or uniform per layer")
    delta_r: int = opt(10, "readjust the masks every this many rounds", ge=1)
    alpha: float = opt(0.01, "initial share of each layer's kept weights that a readjustment replaces", gt=0, le=1)
    r_end: float = opt(0.5, "fraction of the rounds after which masks stop changing", gt=0, le=1)


@METHODS.register(
    "feddst",
    FedDSTConfig,
    summary="FedDST (Bibikar et al. 2022): fixed-density sparse FedAvg, clients prune and regrow RigL-style",
)
class FedDST(Method):
    """Federated dynamic sparse training (FedDST).

    Bibikar et al., "Federated Dynamic Sparse Training: Computing Less, Communicating Less, Yet
    Learning Better", AAAI 2022, https://arxiv.org/abs/2112.09824.

    Parameters
    ----------
    config:
        :class:`FedDSTConfig`: ``sparsity``, ``mask_init``, ``delta_r``, ``alpha``, ``r_end``.
    experiment, spec, profile:
        As for every :class:`~sparsefl.methods.base.Method`.
    """

    config_cls = FedDSTConfig
    config: FedDSTConfig

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        #: state_dict names the mask covers: every Conv and Linear weight
        self.scope: list[str] = default_scope(spec.template)
        #: the last round at which masks change (RigL's T_end, in rounds)
        self.r_end: int = schedule_end(
            experiment.federation.rounds, ("method.delta_r", self.config.delta_r), ("method.r_end", self.config.r_end)
        )

    # ---------------------------------------------------------------------------------- schedule
    def _fraction(self, rnd: int) -> float:
        """``alpha_t`` of round ``rnd`` (1-based): RigL's cosine decay from ``alpha`` at round 0
        to 0 at ``r_end``; 0 unless ``rnd`` is a readjustment round (a multiple of ``delta_r``)."""
        if rnd % self.config.delta_r != 0 or rnd >= self.r_end:
            return 0.0
        return cosine_fraction(rnd, self.r_end, self.config.alpha)

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """Layer-wise magnitude pruning of the seeded initial weights to ERK or uniform layer
        densities (as the reference code does)."""
        scores = {n: params[n].detach().abs() for n in self.scope}
        rule = "erk" if self.config.mask_init == "erk" else "layerwise"
        mask = allocate(scores, self.config.sparsity, allocation=rule, min_keep=0)
        return ServerState(round=0, params=mask.applied(params), mask=mask)

    def setup_payload(self, state: ServerState) -> Update | None:
        """The global mask, sent again to each client whose copy is older."""
        return mask_setup(state)

    def known_masks(self, setup: Update) -> dict[str, Tensor]:
        """The global mask: a message whose mask equals it carries a fingerprint instead."""
        return setup_masks(setup)

    def task_config(self, state: ServerState, clients: Sequence[int]) -> dict[int, TaskConfig]:
        """On a readjustment round every client gets ``alpha_t`` as ``fraction``."""
        f = self._fraction(state.round + 1)
        return {c: {"fraction": f} for c in clients} if f > 0 else {}

    def broadcast(self, state: ServerState) -> Update:
        """Kept values of the masked tensors, the global mask as ``sent``."""
        assert state.mask is not None
        return Update(values=state.mask.applied(state.params), sent=dict(state.mask.items()))

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """Sparse weighted average (each weight over the clients that kept it), then the
        magnitude consensus of the aggregate at the fixed per-layer counts."""
        if not received:
            return ServerState(round=state.round + 1, params=state.params, mask=state.mask, extra=state.extra)
        return consensus_aggregate(state, received)

    def eval_params(self, state: ServerState) -> StateDict:
        """The masked global parameters."""
        assert state.mask is not None
        return state.mask.applied(state.params)

    # ---------------------------------------------------------------------------------- client
    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Load the kept values; the round's mask is the downlink's ``sent`` set."""
        model.load_state_dict(down.values, strict=True)
        out = {k: v for k, v in client_state.items() if not k.startswith("feddst.")}
        if not all(n in down.sent for n in self.scope):
            raise ValueError("feddst: the downlink carries no mask for the masked tensors")
        out.update({_MASK + n: down.sent[n] for n in self.scope})
        return out

    def prepare(self, model: nn.Module, data: ClientData, client_state: ClientState, ctx: LocalContext) -> ClientState:
        """On a readjustment round, set aside one batch of the client's data (drawn from its own
        generator) for the dense gradient that chooses the regrown weights."""
        if float(ctx.config.get("fraction", 0.0)) <= 0:
            return client_state
        gen = torch_gen(ctx.seed, "feddst", "grad", ctx.client_id, ctx.round)
        take = torch.randperm(len(data.x), generator=gen)[: max(1, ctx.local.batch_size)]
        return {**client_state, _BX: data.x[take], _BY: data.y[take]}

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks | None:
        """Masked SGD on this round's mask."""
        mask = {n: client_state[_MASK + n] for n in self.scope}
        return StaticMaskHooks(model, self.profile, mask, "dense", min(ctx.local.batch_size, max(1, ctx.num_examples)))

    @property
    def why_not_batched(self) -> str | None:
        """None: local training is ``StaticMaskHooks``' dense masked step, which the batched
        executor runs; the RigL step happens in :meth:`upload`, after it."""
        return None

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Kept values and the client's mask, after the RigL step on a readjustment round."""
        state = {k: v for k, v in client_state.items() if not k.startswith("feddst.")}
        mask = Mask({n: client_state[_MASK + n] for n in self.scope})
        fraction = float(ctx.config.get("fraction", 0.0))
        if fraction > 0 and _BX in client_state:
            grads = dense_grads(model, client_state[_BX], client_state[_BY], self.scope)
            weights = dict(model.named_parameters())
            mask = rigl_step(mask, {n: weights[n].detach() for n in self.scope}, grads, fraction)
        values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n in self.scope:
            values[n] = values[n] * mask[n].to(device=values[n].device, dtype=values[n].dtype)
        return Update(values=values, sent={n: mask[n].to(values[n].device) for n in self.scope}), state
