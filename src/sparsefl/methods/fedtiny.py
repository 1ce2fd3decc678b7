"""FedTiny (Huang et al., ICDCS 2023): adaptive BatchNorm selection, then progressive pruning.

Huang, Zhang, Sun, Fang, Yuan, Wu, "Distributed Pruning Towards Tiny Neural Networks in
Federated Learning" (https://arxiv.org/abs/2212.01977). Two modules:

* **Adaptive BatchNorm selection (ABNS)**, round 1: the server's candidate coarse masks are
  magnitude masks of the initial model at the target sparsity under different layer-wise
  allocations (global, layer-wise, ERK, LAMP, then random layer-wise masks). Every sampled client
  rebuilds the candidates from the weights it received, re-estimates each candidate's BatchNorm
  statistics on its own data, evaluates its loss there and uploads the losses; the server keeps
  the candidate with the smallest sample-weighted mean loss. Clients train nothing that round.
* **Progressive pruning**, every ``adjust_every`` rounds until ``adjust_until``: clients train the
  masked model and also upload, per adjusted layer, the top-K entries of the mean dense gradient
  of its removed weights (the same record as the kept weights: ``sent`` = mask + those K); the
  server regrows the K removed weights with the largest aggregated |gradient| and drops the K
  kept ones of smallest aggregated magnitude (:func:`sparsefl.pruning.dst.drop_and_grow`), so the
  density never changes. K follows RigL's cosine decay of the kept count.

The global mask travels in the setup payload: once per client, and again to a client whose copy
is older than the current mask, so each change is paid once per client that receives it; in
between, each tensor's mask is a 4-byte fingerprint. Helpers shared with FedRTS (masked SGD
that records the dense gradient, the upload of top-K gradients, splitting it on the server) live
here.
Options and every choice where the paper is silent: ``docs/methods/fedtiny.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefl.accounting import ModelProfile
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.masks import Mask, default_scope
from sparsefl.methods.base import Functional, LocalHooks, Method, mask_setup, schedule_end, setup_masks
from sparsefl.methods.static_mask import StaticMaskHooks
from sparsefl.models import ModelSpec
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.messages import (
    ClientData,
    ClientState,
    LocalContext,
    Received,
    ServerState,
    StateDict,
    TaskConfig,
)
from sparsefl.pruning import allocate, cosine_fraction, drop_and_grow
from sparsefl.pruning.allocation import ALLOCATIONS, topk_mask
from sparsefl.pruning.dst import layer_k
from sparsefl.registry import METHODS
from sparsefl.rng import torch_gen

Tensor = torch.Tensor
Progressive = Literal["all", "layer"]

# Client-state keys (flat dict of tensors), all dropped by upload.
_MASK = "dst.mask."  # + weight name: this round's mask (from the downlink)
_GRAD = "dst.grad."  # + weight name: mean dense gradient over the round's local steps
_LOSS = "fedtiny.losses"  # ABNS: each candidate's loss on the client's data


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DstConfig(MethodConfig):
    """Options shared by the server-driven dynamic-sparse methods (FedTiny, FedRTS)."""

    sparsity: float = opt(0.9, "fraction of the prunable weights removed (fixed throughout)", ge=0, lt=1)
    adjust_every: int = opt(5, "the mask is adjusted every this many rounds (Delta T)", ge=1)
    adjust_until: float = opt(
        0.75, "the mask changes until this fraction of federation.rounds (T_end), then stays", gt=0, le=1
    )
    alpha: float = opt(0.2, "initial share of each layer's kept weights replaced; cosine-decayed to T_end", gt=0, le=1)


@dataclass(frozen=True)
class FedTinyConfig(DstConfig):
    """Options of FedTiny (docs/methods/fedtiny.md)."""

    candidates: int = opt(
        4, "ABNS candidate pool: magnitude masks under global, layerwise, erk, lamp, then random masks", ge=1, le=16
    )
    bn_samples: int = opt(256, "ABNS: at most this many of a client's samples re-estimate BN and score", ge=1)
    progressive: Progressive = opt(
        "all", "all: every layer at every adjustment; layer: one layer per adjustment, last to first"
    )


# --------------------------------------------------------------------------------------------------
# Client hooks and helpers shared with FedRTS
# --------------------------------------------------------------------------------------------------


class GradRecordingHooks(StaticMaskHooks):
    """Masked SGD (removed weights stay 0) that also accumulates the dense gradient of the
    ``record`` layers before masking it; :meth:`close` stores its mean over the steps in
    ``client_state`` (``dst.grad.<name>``). Their weight gradient is counted dense."""

    def __init__(
        self,
        model: nn.Module,
        profile: ModelProfile,
        mask: Mapping[str, Tensor],
        client_state: ClientState,
        record: Sequence[str] = (),
    ) -> None:
        super().__init__(model, profile, mask)
        self._state = client_state
        self._sum = {n: torch.zeros_like(self._params[n], dtype=torch.float64) for n in record}
        self._steps = 0
        self.count_dense_grads(record)  # the dense weight gradient is what the top-K is taken from

    def after_backward(self, step: int) -> None:
        """Add the dense gradients of the recorded layers, then zero those of removed weights."""
        for n, acc in self._sum.items():
            g = self._params[n].grad
            if g is not None:
                acc.add_(g.to(torch.float64))
        self._steps += 1
        super().after_backward(step)

    def close(self) -> None:
        super().close()
        for n, acc in self._sum.items():
            self._state[_GRAD + n] = (acc / max(self._steps, 1)).to(torch.float32)

    def functional(self) -> Functional | None:
        """None: the gradient sums need the sequential loop's ``after_backward``."""
        return None


def top_removed(grad: Tensor, mask: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` removed positions with the largest ``|grad|`` (ties: lower index),
    on ``mask``'s device (the selection itself runs on the CPU, as :func:`topk_mask`)."""
    m = mask.cpu()
    score = torch.where(m, -math.inf, grad.detach().abs().to(device="cpu", dtype=torch.float64))
    return (topk_mask(score, k) & ~m).to(mask.device)


def split_upload(received: Received, mask: Mask) -> tuple[Update, dict[str, Tensor]]:
    """One decoded upload as (kept weights: values zeroed off the mask, sent = the mask; the
    gradients it reported at removed positions, zero elsewhere)."""
    values = dict(received.update.values)
    sent: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    for n, m in mask.items():
        if n not in values:
            continue
        s = received.update.sent.get(n)
        if s is not None:
            extra = s & ~m
            if bool(extra.any()):
                grads[n] = torch.where(extra, values[n], torch.zeros_like(values[n])).to(torch.float64)
        values[n] = values[n] * m.to(values[n].dtype)
        sent[n] = m
    return Update(values=values, sent=sent), grads


def mask_of(client_state: ClientState, scope: Sequence[str]) -> dict[str, Tensor] | None:
    """The round's mask from the client state, or None when the downlink carried none."""
    if not all(_MASK + n in client_state for n in scope):
        return None
    return {n: client_state[_MASK + n] for n in scope}


class ServerMaskDst(Method):
    """Sparse FedAvg on a global mask that the server changes at fixed density, with clients'
    top-K gradients of removed weights on adjustment rounds (the base of FedTiny and FedRTS).

    Subclasses decide the mask (``init_state``/``aggregate``); this class carries the mask on
    the downlink, trains with :class:`GradRecordingHooks` and uploads kept weights plus, when the
    task says ``adjust``, the top-K gradients of each adjusted layer's removed weights.
    """

    config: DstConfig
    #: the first round that may end with an adjustment (a subclass may spend earlier ones)
    first_adjustable = 1

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        #: state_dict names of the prunable weights (every Conv and Linear weight)
        self.scope: list[str] = default_scope(spec.template)
        if not self.scope:
            raise ConfigError("model.name", experiment.model.name, "a model with Conv or Linear layers to prune")
        #: T_end: the last round at which the mask may change
        self.t_end = schedule_end(
            experiment.federation.rounds,
            ("method.adjust_every", self.config.adjust_every),
            ("method.adjust_until", self.config.adjust_until),
            first=self.first_adjustable,
        )

    # ------------------------------------------------------------------------------- schedule
    def _adjusts(self, rnd: int) -> bool:
        """Whether round ``rnd`` (1-based) ends with a mask adjustment."""
        return rnd % self.config.adjust_every == 0 and rnd <= self.t_end and self._fraction(rnd) > 0

    def _fraction(self, rnd: int) -> float:
        """RigL's cosine-decayed share of each layer's kept weights replaced at round ``rnd``."""
        return cosine_fraction(rnd, self.t_end, self.config.alpha)

    def _adjusted_layers(self, rnd: int) -> list[str]:
        """The layers an adjustment at round ``rnd`` changes (default: every prunable layer)."""
        return list(self.scope)

    def _layer_ks(self, mask: Mask, rnd: int) -> dict[str, int]:
        """Per adjusted layer, how many weights round ``rnd`` replaces."""
        f = self._fraction(rnd)
        out = {}
        for n in self._adjusted_layers(rnd):
            kept = int(mask[n].sum())
            out[n] = layer_k(f, kept, mask[n].numel() - kept)
        return out

    # ---------------------------------------------------------------------------------- server
    def task_config(self, state: ServerState, clients: Sequence[int]) -> Mapping[int, TaskConfig]:
        """``adjust`` (the replaced share) on adjustment rounds: clients then report top-K gradients."""
        rnd = state.round + 1
        if state.mask is None or not self._adjusts(rnd):
            return {}
        return {c: {"adjust": self._fraction(rnd)} for c in clients}

    def setup_payload(self, state: ServerState) -> Update | None:
        """The global mask once it exists, sent again to each client whose copy is older."""
        return mask_setup(state)

    def known_masks(self, setup: Update) -> dict[str, Tensor]:
        """The global mask: a message whose mask equals it carries a fingerprint instead."""
        return setup_masks(setup)

    def broadcast(self, state: ServerState) -> Update:
        """The masked global parameters with the mask as ``sent`` (dense before a mask exists)."""
        if state.mask is None:
            return Update(values=state.params)
        return Update(values=state.mask.applied(state.params), sent=dict(state.mask.items()))

    def eval_params(self, state: ServerState) -> StateDict:
        """The masked global parameters (the dense initial ones before a mask exists)."""
        return state.params if state.mask is None else state.mask.applied(state.params)

    def update_norm(self, state: ServerState, received: Received) -> float:
        """The change of the kept weights only (reported gradients are not weights)."""
        if state.mask is None:
            return 0.0
        clean, _ = split_upload(received, state.mask)
        return super().update_norm(state, Received(received.client_id, clean, received.num_examples))

    def _average(self, state: ServerState, received: Sequence[Received]) -> tuple[StateDict, list[dict[str, Tensor]]]:
        """Sample-weighted mean of the kept weights (and every other tensor), and each client's
        reported gradients."""
        assert state.mask is not None
        parts = [split_upload(r, state.mask) for r in received]
        counts = [r.num_examples for r in received]
        new = agg.weighted_mean([u for u, _ in parts], counts, list(state.params))
        return new, [g for _, g in parts]

    # ---------------------------------------------------------------------------------- client
    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Load the parameters; the round's mask is the downlink's ``sent`` (none before one exists)."""
        model.load_state_dict(down.values, strict=True)
        out = {k: v for k, v in client_state.items() if not k.startswith(("dst.", "fedtiny."))}
        if all(n in down.sent for n in self.scope):
            out.update({_MASK + n: down.sent[n] for n in self.scope})
        return out

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks | None:
        """Masked SGD, recording the adjusted layers' dense gradients on adjustment rounds."""
        mask = mask_of(client_state, self.scope)
        if mask is None:
            if "role" in ctx.config:
                return None
            raise ValueError(f"{type(self).__name__}: the downlink carries no mask for the masked tensors")
        record = self._adjusted_layers(ctx.round) if "adjust" in ctx.config else []
        return GradRecordingHooks(model, self.profile, mask, client_state, record)

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Kept weights (``sent`` = the mask); on adjustment rounds also each adjusted layer's top-K
        mean gradients at removed positions, in the same record (``sent`` = mask + those K)."""
        state = {k: v for k, v in client_state.items() if not k.startswith(("dst.", "fedtiny."))}
        mask = mask_of(client_state, self.scope)
        assert mask is not None
        values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sent = dict(mask)
        for n in self.scope:
            values[n] = values[n] * mask[n].to(values[n].dtype)
        frac = ctx.config.get("adjust")
        if isinstance(frac, float):
            for n in self._adjusted_layers(ctx.round):
                g = client_state.get(_GRAD + n)
                if g is None:
                    continue
                kept = int(mask[n].sum())
                top = top_removed(g, mask[n], layer_k(frac, kept, mask[n].numel() - kept))
                values[n] = torch.where(top, g.to(values[n].dtype), values[n])
                sent[n] = mask[n] | top
        return Update(values=values, sent=sent), state


# --------------------------------------------------------------------------------------------------
# ABNS
# --------------------------------------------------------------------------------------------------


def candidate_masks(
    params: Mapping[str, Tensor], scope: Sequence[str], sparsity: float, count: int, seed: int
) -> list[Mask]:
    """The ABNS candidate pool: magnitude masks of ``params`` at ``sparsity`` under the allocation
    rules global, layerwise, erk, lamp (in that order), then random layer-wise masks seeded from
    ``(seed, "fedtiny", "candidate", i)``. A pure function: server and clients build the same."""
    mags = {n: params[n].detach().abs().to(torch.float64) for n in scope}
    out = []
    for i in range(count):
        if i < len(ALLOCATIONS):
            out.append(allocate(mags, sparsity, allocation=ALLOCATIONS[i]))
        else:
            gen = torch_gen(seed, "fedtiny", "candidate", i)
            rand = {n: torch.rand(mags[n].shape, generator=gen, dtype=torch.float64) for n in scope}
            out.append(allocate(rand, sparsity, allocation="layerwise"))
    return out


@torch.no_grad()
def bn_adapted_loss(model: nn.Module, mask: Mask, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Loss of ``model`` with ``mask`` applied after its BatchNorm statistics are re-estimated on
    ``x`` (cumulative averages over train-mode forward passes), evaluated on ``x, y``. The model's
    tensors and BN settings are restored afterwards."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    try:
        mask.apply_to_model_(model)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
        model.train()
        for i in range(0, len(x), batch_size):
            if len(x[i : i + batch_size]) > 1 or len(x) == 1:
                model(x[i : i + batch_size])
        model.eval()
        total = 0.0
        for i in range(0, len(x), batch_size):
            total += float(F.cross_entropy(model(x[i : i + batch_size]), y[i : i + batch_size], reduction="sum"))
        return total / max(len(x), 1)
    finally:
        for m, mo in zip(bns, momenta, strict=True):
            m.momentum = mo
        model.load_state_dict(saved)
        model.train()


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@METHODS.register(
    "fedtiny",
    FedTinyConfig,
    summary="FedTiny (Huang et al. 2023): adaptive-BN choice of a coarse mask, then top-K-gradient progressive pruning",
)
class FedTiny(ServerMaskDst):
    """FedTiny: adaptive BatchNorm selection of a coarse mask, then progressive pruning.

    Paper: https://arxiv.org/abs/2212.01977 (docs/methods/fedtiny.md for every choice).

    Parameters
    ----------
    config:
        :class:`FedTinyConfig`: ``sparsity``, the schedule (``adjust_every``, ``adjust_until``,
        ``alpha``), ``candidates``, ``bn_samples`` and ``progressive``.
    experiment, spec, profile:
        The experiment, the model and its FLOP profile.
    """

    config_cls = FedTinyConfig
    config: FedTinyConfig
    first_adjustable = 2  # round 1 chooses the coarse mask (ABNS)

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        first = spec.template.state_dict()[self.scope[0]]
        if first.numel() < self.config.candidates:
            # the candidates' losses travel in the first coordinates of the first prunable weight
            raise ConfigError(
                "method.candidates", self.config.candidates, f"at most {first.numel()} (the size of {self.scope[0]})"
            )

    def _adjusted_layers(self, rnd: int) -> list[str]:
        """Every layer (``all``), or one per adjustment from the last layer to the first (``layer``)."""
        if self.config.progressive == "all":
            return list(self.scope)
        step = rnd // self.config.adjust_every - 1
        return [self.scope[::-1][step % len(self.scope)]]

    def _candidates(self, params: Mapping[str, Tensor]) -> list[Mask]:
        cfg = self.config
        return candidate_masks(params, self.scope, cfg.sparsity, cfg.candidates, self.experiment.seed)

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """The dense initial model; the mask is chosen by the clients' ABNS losses in round 1."""
        return ServerState(round=0, params=params)

    def task_config(self, state: ServerState, clients: Sequence[int]) -> Mapping[int, TaskConfig]:
        """``role=abns`` while no mask is chosen; ``adjust`` on adjustment rounds."""
        if state.mask is None:
            return {c: {"role": "abns"} for c in clients}
        return super().task_config(state, clients)

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """ABNS: keep the candidate of least mean loss. Otherwise FedAvg of the kept weights and,
        on an adjustment round, regrow the top-K aggregated gradients, drop as many smallest."""
        rnd = state.round + 1
        if state.mask is None:
            return self._select(state, received)
        new, grads = self._average(state, received)
        mask = state.mask
        if self._adjusts(rnd):
            total = float(sum(r.num_examples for r in received))
            ks = self._layer_ks(mask, rnd)
            agg_g = {n: torch.zeros(mask[n].shape, dtype=torch.float64) for n in ks}
            for r, g in zip(received, grads, strict=True):
                for n in ks:
                    if n in g:
                        agg_g[n] += g[n] * (r.num_examples / total)
            kept = {n: int(m.sum()) for n, m in mask.items()}
            frac = {n: (ks[n] / kept[n] if n in ks and kept[n] else 0.0) for n in mask}
            grow = {n: agg_g[n].abs() if n in agg_g else torch.zeros(mask[n].shape) for n in mask}
            mask = drop_and_grow(mask, new, grow, frac)
        return ServerState(round=rnd, params=mask.applied(new), mask=mask, extra=state.extra)

    def _select(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """The ABNS round: sample-weighted mean loss per candidate; the least wins (ties: the
        first). No report at all: no mask yet, and the next round runs ABNS again."""
        c, name = self.config.candidates, self.scope[0]
        total, mean = 0.0, torch.zeros(c, dtype=torch.float64)
        for r in received:
            s = r.update.sent.get(name)
            if s is None or not bool(s.reshape(-1)[:c].all()):
                continue
            mean += r.update.values[name].reshape(-1)[:c].to(torch.float64) * r.num_examples
            total += r.num_examples
        if total == 0:
            return ServerState(round=state.round + 1, params=state.params, extra=state.extra)
        best = int(torch.argmin(mean / total))
        mask = self._candidates(state.params)[best]
        extra = {**state.extra, "fedtiny.losses": mean / total, "fedtiny.choice": torch.tensor(best)}
        return ServerState(round=state.round + 1, params=mask.applied(state.params), mask=mask, extra=extra)

    # ---------------------------------------------------------------------------------- client
    def prepare(self, model: nn.Module, data: ClientData, client_state: ClientState, ctx: LocalContext) -> ClientState:
        """ABNS: each candidate's loss after re-estimating BN statistics, on up to ``bn_samples``
        of the client's samples in its local loop's shuffled order."""
        if ctx.config.get("role") != "abns":
            return client_state
        take = torch.randperm(len(data.x), generator=torch_gen(ctx.seed, "local", ctx.client_id, ctx.round))
        take = take[: self.config.bn_samples]
        x, y = data.x[take], data.y[take]
        bs = max(2, min(ctx.local.batch_size, len(x)))
        losses = [bn_adapted_loss(model, m, x, y, bs) for m in self._candidates(model.state_dict())]
        return {**client_state, _LOSS: torch.tensor(losses, dtype=torch.float32)}

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """ABNS: the candidates' losses as the first coordinates of the first prunable weight
        (the wire carries only model-named tensors); otherwise the base's upload."""
        if ctx.config.get("role") != "abns":
            return super().upload(model, down, client_state, ctx)
        state = {k: v for k, v in client_state.items() if not k.startswith(("dst.", "fedtiny."))}
        name, losses = self.scope[0], client_state[_LOSS]
        shape, dtype = down.values[name].shape, down.values[name].dtype
        flat = torch.zeros(math.prod(shape), dtype=dtype)
        flat[: len(losses)] = losses.to(dtype)
        sent = torch.zeros(math.prod(shape), dtype=torch.bool)
        sent[: len(losses)] = True
        return Update(values={name: flat.view(shape)}, sent={name: sent.view(shape)}), state
