"""PruneFL: initial pruning at one client, then adaptive pruning and regrowth (Jiang et al., TNNLS 2022).

Round 1 is the *initial pruning* round: the server's task settings name one client (the first
sampled; the others train nothing), which trains the dense model on its own data while summing
every step's squared gradients, then applies the greedy rule below ``ip_steps`` times, starting
dense, and uploads its pruned model (kept values and mask); the server adopts it.
Afterwards clients train the kept weights (removed ones get zero gradients). Every ``interval``
rounds (reconfiguration rounds) each client also sums, over its local steps, the squared
gradients at the removed positions and sends them in the removed coordinates of its weight
tensors (so that round's uplink is dense, and counted so). The server adds them to the squared
updates of the kept weights (``((w_k - w) / lr)^2``, sample-weighted, as the reference code
does) accumulated since the last reconfiguration and re-chooses the mask with PruneFL's greedy
rule: keep the ``1 - max_dec`` largest-magnitude kept weights of each layer, then add candidates
in decreasing order of squared gradient per unit of time while that ratio exceeds the current
``sum(g^2) / T(M)`` (which maximises the ratio). The per-weight time cost
comes from our FLOP model instead of the paper's device measurements: :func:`time_costs`.

The global mask travels in the setup payload: once per client, and again to a client whose copy
is older than the current mask, so each change is paid once per client that receives it; in
between, each tensor's mask is a 4-byte fingerprint. Kept values only on both links.
Options and every choice: ``docs/methods/prunefl.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparsefl.accounting import ModelProfile
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.masks import Mask, default_scope
from sparsefl.methods.base import Functional, LocalHooks, Method, mask_setup, setup_masks
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
from sparsefl.protocol.sampling import round_lr
from sparsefl.pruning.allocation import num_kept, topk_mask
from sparsefl.registry import METHODS

Tensor = torch.Tensor

_MASK = "prunefl.mask."  # client state: + weight name, this round's mask
_SQG = "prunefl.sqg."  # client state: + weight name, this round's summed squared gradients
_ACC = "prunefl.acc."  # ServerState.extra: + weight name, squared updates since the last reconfiguration


@dataclass(frozen=True)
class PruneFLConfig(MethodConfig):
    """Options of PruneFL (docs/methods/prunefl.md)."""

    interval: int = opt(10, "re-choose the mask every this many rounds (reconfiguration rounds)", ge=1)
    sparsity: float = opt(
        0.0, "least fraction of the scope's weights removed (a hard bound; the objective may remove more)", ge=0, lt=1
    )
    max_dec: float = opt(
        0.3, "share of each layer's kept weights (smallest magnitude) a reconfiguration may remove", ge=0, le=1
    )
    ip_steps: int = opt(5, "initial pruning: greedy reconfigurations the chosen client applies after training", ge=1)
    fixed_cost: float = opt(
        0.1, "round time that does not depend on the kept weights, as a fraction of the dense per-weight total", gt=0
    )
    comm_flops_per_byte: float = opt(1000.0, "time of one byte on a link, in FLOPs of the client's compute", ge=0)
    samples_per_round: int = opt(100, "training samples per client and round assumed by the time model", ge=1)


def time_costs(profile: ModelProfile, scope: Sequence[str], samples: int, comm_per_byte: float) -> dict[str, float]:
    """Per-weight round time of each layer, in FLOPs: training ``6 * macs / weight_numel`` FLOPs
    per sample (forward, input and weight gradients, 2 FLOPs per MAC) times ``samples``, plus its
    4 bytes down and 4 up times ``comm_per_byte``. A convolution weight is reused at every output
    position, so it costs more than a linear one."""
    out = {}
    for n in scope:
        layer = profile.layer(n)
        out[n] = 6.0 * layer.macs / max(1, layer.weight_numel) * samples + 8.0 * comm_per_byte
    return out


def greedy_mask(
    sqg: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    mask: Mapping[str, Tensor] | None,
    costs: Mapping[str, float],
    base_sqg: float,
    base_time: float,
    max_dec: float,
    max_keep: int,
) -> Mask:
    """PruneFL's greedy choice of the kept set ``M`` maximising ``sum_{j in M} g_j^2 / T(M)``.

    Parameters
    ----------
    sqg:
        Name -> accumulated squared gradients (the importance ``g_j^2``).
    weights, mask:
        Current weights and mask; per layer the ``1 - max_dec`` share of kept weights of largest
        ``|w|`` stay for sure (``mask=None``: nothing is sure, every weight is a candidate). Where
        they exceed ``max_keep``, each layer's sure count shrinks in proportion (at least 1).
    costs:
        Name -> time of one kept weight of that layer; ``T(M) = base_time + sum_j cost_j``.
    base_sqg:
        Squared gradients of the tensors outside the scope (always kept).
    max_keep:
        At most this many kept weights in all (the sure ones count; a hard bound, up to the
        one weight each layer keeps).

    Returns
    -------
    Mask
        The sure weights plus the longest prefix of the candidates, sorted by ``g_j^2 / cost_j``
        (ties: layer order, then index), whose every member exceeds the ratio before it.
    """
    names = list(sqg)
    # on the CPU, as the Mask it returns (a client on a GPU hands over its own tensors)
    sqg = {n: t.cpu() for n, t in sqg.items()}
    weights = {n: weights[n].cpu() for n in names}
    num, den = float(base_sqg), float(base_time)
    kept = {
        n: (mask[n] if mask is not None else torch.zeros(sqg[n].shape, dtype=torch.bool)).reshape(-1) for n in names
    }
    stay = {n: int(kept[n].sum()) - math.floor(max_dec * int(kept[n].sum()) + 1e-9) for n in names}
    total_stay = sum(stay.values())
    if total_stay > max_keep:  # the bound is hard: every layer's sure share shrinks in proportion
        stay = {n: min(s, max(1, math.floor(s * max_keep / total_stay))) for n, s in stay.items()}
    sure: dict[str, Tensor] = {}
    for n in names:
        mag = torch.where(kept[n], weights[n].detach().reshape(-1).to(torch.float64).abs(), -math.inf)
        sure[n] = topk_mask(mag, stay[n]) & kept[n]
        num += float(sqg[n].reshape(-1).to(torch.float64)[sure[n]].sum())
        den += costs[n] * int(sure[n].sum())
    cand = [(~sure[n]).nonzero().reshape(-1) for n in names]
    s = torch.cat([sqg[n].reshape(-1).to(torch.float64)[c] for n, c in zip(names, cand)])
    c = torch.cat([torch.full((len(ci),), costs[n], dtype=torch.float64) for n, ci in zip(names, cand)])
    v = s / c
    order = torch.sort(-v, stable=True).indices
    s, c, v = s[order], c[order], v[order]
    before_s = torch.cumsum(s, 0) - s
    before_c = torch.cumsum(c, 0) - c
    accept = v * (den + before_c) > num + before_s
    n_add = int(accept.long().cumprod(0).sum())
    n_add = max(0, min(n_add, max_keep - sum(int(x.sum()) for x in sure.values())))
    chosen = order[:n_add]
    keep = {n: sure[n].clone() for n in names}
    offsets = [0]
    for ci in cand:
        offsets.append(offsets[-1] + len(ci))
    for i, n in enumerate(names):
        mine = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
        keep[n][cand[i][mine]] = True
    return Mask({n: keep[n].view(sqg[n].shape) for n in names})


class SquaredGradHooks(StaticMaskHooks):
    """Masked SGD that also sums every step's squared gradients into ``sqg`` (before the
    removed weights' gradients are zeroed)."""

    def __init__(self, model: nn.Module, profile: ModelProfile, mask: Mapping[str, Tensor], sqg: dict[str, Tensor]):
        super().__init__(model, profile, mask)
        self.sqg = sqg
        self._named = dict(model.named_parameters())
        self.count_dense_grads([n for n in sqg if n in mask])  # squared gradients are read whole

    def after_backward(self, step: int) -> None:
        for n, acc in self.sqg.items():
            g = self._named[n].grad
            if g is not None:
                acc.add_(g.detach().to(acc.dtype).square())
        super().after_backward(step)

    def functional(self) -> Functional | None:
        """None: the squared-gradient sums need the sequential loop's ``after_backward``."""
        return None


@METHODS.register(
    "prunefl",
    PruneFLConfig,
    summary="PruneFL (Jiang et al. 2022): pruning at one client, adaptive prune/regrow by squared gradient per time",
)
class PruneFL(Method):
    """PruneFL: model pruning for efficient federated learning on edge devices.

    Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices", IEEE
    TNNLS 2022, https://arxiv.org/abs/1909.12326.

    Parameters
    ----------
    config:
        :class:`PruneFLConfig`.
    experiment, spec, profile:
        As for every :class:`~sparsefl.methods.base.Method`.
    """

    config_cls = PruneFLConfig
    config: PruneFLConfig

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        cfg = self.config
        #: state_dict names the mask covers: every Conv and Linear weight
        self.scope: list[str] = default_scope(spec.template)
        sd = spec.template.state_dict()
        self.numel = sum(sd[n].numel() for n in self.scope)
        #: per-weight round time of each layer (FLOPs) and the weight-independent part
        self.costs = time_costs(profile, self.scope, cfg.samples_per_round, cfg.comm_flops_per_byte)
        self.base_time = cfg.fixed_cost * sum(self.costs[n] * sd[n].numel() for n in self.scope)
        self.max_keep = num_kept(self.numel, cfg.sparsity)
        self._trainable = {n for n, p in spec.template.named_parameters() if p.is_floating_point()}

    def _reconfigures(self, rnd: int) -> bool:
        return rnd > 1 and (rnd - 1) % self.config.interval == 0

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """The dense initial model; round 1 chooses the mask."""
        return ServerState(round=0, params=params)

    def task_config(self, state: ServerState, clients: Sequence[int]) -> dict[int, TaskConfig]:
        """Initial pruning: ``role=ip`` for the first sampled client, ``idle`` for the rest;
        reconfiguration rounds: ``sqg=True`` for everyone."""
        if state.mask is None:
            return {c: {"role": "ip" if i == 0 else "idle"} for i, c in enumerate(clients)}
        if self._reconfigures(state.round + 1):
            return {c: {"sqg": True} for c in clients}
        return {}

    def setup_payload(self, state: ServerState) -> Update | None:
        """The global mask once it exists, sent again to each client whose copy is older."""
        return mask_setup(state)

    def known_masks(self, setup: Update) -> dict[str, Tensor]:
        """The global mask: a message whose mask equals it carries a fingerprint instead."""
        return setup_masks(setup)

    def broadcast(self, state: ServerState) -> Update:
        """Kept values and the mask (dense before the mask exists)."""
        if state.mask is None:
            return Update(values=state.params)
        return Update(values=state.mask.applied(state.params), sent=dict(state.mask.items()))

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """Initial pruning, or FedAvg on the mask plus the accumulation of squared updates and,
        on a reconfiguration round, the new mask."""
        rnd = state.round + 1
        sd_names = list(state.params)
        if state.mask is None:  # initial pruning: adopt the chosen client's pruned model
            for r in sorted(received, key=lambda r: r.client_id):
                if all(n in r.update.sent for n in self.scope):
                    mask = Mask({n: r.update.sent[n] for n in self.scope})
                    params = {n: r.update.values.get(n, v) for n, v in state.params.items()}
                    return ServerState(round=rnd, params=mask.applied(params), mask=mask)
            return ServerState(round=rnd, params=state.params)
        if not received:
            return ServerState(round=rnd, params=state.params, mask=state.mask, extra=state.extra)
        mask = state.mask
        reconf = self._reconfigures(rnd)
        updates, sizes = [], [r.num_examples for r in received]
        removed: dict[str, Tensor] = {n: torch.zeros(mask[n].shape, dtype=torch.float64) for n in self.scope}
        total = float(sum(sizes))
        for r, size in zip(received, sizes):
            values = dict(r.update.values)
            if reconf:  # removed coordinates carry the client's squared gradients
                for n in self.scope:
                    v = values[n].to(torch.float64)
                    removed[n] += torch.where(mask[n], 0.0, v) * (size / total)
                    values[n] = torch.where(mask[n], values[n], torch.zeros_like(values[n]))
            updates.append(Update(values=values, sent={n: mask[n] for n in self.scope}))
        new = agg.per_coordinate(updates, sizes, state.params, sd_names)
        lr = round_lr(self.experiment.local.lr, self.experiment.local.lr_end, rnd, self.experiment.federation.rounds)
        acc = {k: v.clone() for k, v in state.extra.items()}
        for n in sd_names:
            if n not in self._trainable:
                continue
            cur = state.params[n].to(torch.float64)
            sq = torch.zeros_like(cur)
            for u, size in zip(updates, sizes):
                if n in u.values:
                    sq += ((u.values[n].to(torch.float64) - cur) / lr) ** 2 * (size / total)
            if n in mask:
                sq = sq * mask[n]
            acc[_ACC + n] = acc.get(_ACC + n, torch.zeros_like(sq)) + sq
        if reconf:
            sqg = {n: acc[_ACC + n] + removed[n] for n in self.scope}
            base = sum(float(v.sum()) for k, v in acc.items() if k[len(_ACC) :] not in self.scope)
            mask = greedy_mask(sqg, new, mask, self.costs, base, self.base_time, self.config.max_dec, self.max_keep)
            acc = {}
        return ServerState(round=rnd, params=mask.applied(new), mask=mask, extra=acc)

    def update_norm(self, state: ServerState, received: Received) -> float:
        """Initial-pruning and reconfiguration uploads carry squared gradients: never outliers."""
        if state.mask is None or self._reconfigures(state.round + 1):
            return 0.0
        return super().update_norm(state, received)

    def eval_params(self, state: ServerState) -> StateDict:
        """The masked global parameters (the initial ones before the mask exists)."""
        return state.params if state.mask is None else state.mask.applied(state.params)

    # ---------------------------------------------------------------------------------- client
    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Load the kept values; the round's mask is the downlink's ``sent`` set (none in round 1)."""
        model.load_state_dict(down.values, strict=True)
        out = {k: v for k, v in client_state.items() if not k.startswith("prunefl.")}
        if all(n in down.sent for n in self.scope):
            out.update({_MASK + n: down.sent[n] for n in self.scope})
        return out

    def prepare(self, model: nn.Module, data: ClientData, client_state: ClientState, ctx: LocalContext) -> ClientState:
        """Start the squared-gradient sums at zero: for every parameter at the initial-pruning
        client, for the masked weights on a reconfiguration round."""
        if ctx.config.get("role") == "ip":
            sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
        elif ctx.config.get("sqg"):
            params = dict(model.named_parameters())  # the sums live where the gradients do
            sums = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in self.scope}
        else:
            return client_state
        return {**client_state, **{_SQG + n: s for n, s in sums.items()}}

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks | None:
        """Masked SGD, summing squared gradients on reconfiguration rounds; dense SGD summing
        them at the initial-pruning client; nothing at the other clients of round 1."""
        role = ctx.config.get("role")
        if role == "idle":
            return None
        sqg = {k[len(_SQG) :]: v for k, v in client_state.items() if k.startswith(_SQG)}
        if role == "ip":
            return SquaredGradHooks(model, self.profile, Mask.for_model(model, self.scope), sqg)
        mask = {n: client_state[_MASK + n] for n in self.scope}
        if sqg:
            return SquaredGradHooks(model, self.profile, mask, sqg)
        return StaticMaskHooks(model, self.profile, mask, "dense", min(ctx.local.batch_size, max(1, ctx.num_examples)))

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Round 1: the chosen client's pruned model (the others send nothing). Otherwise the
        kept values and the mask, or on a reconfiguration round whole tensors with the squared
        gradients in the removed coordinates."""
        state = {k: v for k, v in client_state.items() if not k.startswith("prunefl.")}
        role = ctx.config.get("role")
        if role == "idle":
            return Update(values={}), state
        if role == "ip":
            return self._initial_pruning(model, client_state), state
        values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        mask = {n: client_state[_MASK + n] for n in self.scope}
        if ctx.config.get("sqg"):
            for n in self.scope:
                m = mask[n].to(values[n].device)
                values[n] = torch.where(m, values[n], client_state[_SQG + n].to(values[n].dtype))
            return Update(values=values), state
        for n in self.scope:
            values[n] = values[n] * mask[n].to(device=values[n].device, dtype=values[n].dtype)
        return Update(values=values, sent={n: m.to(values[n].device) for n, m in mask.items()}), state

    def _initial_pruning(self, model: nn.Module, client_state: ClientState) -> Update:
        """The chosen client's greedy rule, ``ip_steps`` times from the dense mask, on its trained
        weights and its squared gradients; its kept values and the mask."""
        cfg = self.config
        sqg = {n: client_state[_SQG + n] for n in self.scope}
        base = sum(
            float(v.sum()) for k, v in client_state.items() if k.startswith(_SQG) and k[len(_SQG) :] not in self.scope
        )
        weights = {n: p.detach() for n, p in model.named_parameters()}
        mask = Mask.for_model(model, self.scope)
        for _ in range(cfg.ip_steps):
            nxt = greedy_mask(sqg, weights, mask, self.costs, base, self.base_time, cfg.max_dec, self.max_keep)
            if nxt == mask:
                break
            mask = nxt
        values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for n in self.scope:
            values[n] = values[n] * mask[n].to(device=values[n].device, dtype=values[n].dtype)
        return Update(values=values, sent={n: m.to(values[n].device) for n, m in mask.items()})
