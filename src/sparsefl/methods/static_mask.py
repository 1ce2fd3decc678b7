"""Static-mask sparse FedAvg: one mask from any pruning criterion, clients train the kept weights.

The family of "prune once, then federate a fixed subnetwork" methods: PruneFL's initial pruning
at one client (Jiang et al., TNNLS 2022), SSFL's federated saliency averaged into one global
mask (Huang et al., TMLR) and pruning at initialisation on the server with a proxy batch. Any
registered criterion chooses the weights; ``schedule=gradual`` instead prunes the aggregated
model step by step (gradual Global MP on Zhu & Gupta's cubic schedule).

Where a data-dependent criterion gets its data (``score_source``): the server's proxy batch;
or a scoring round 1, in which the server's task settings name the scoring clients (the first
sampled one with ``client``, every one with ``federated``) and each computes the mask or scores
on its own data in :meth:`StaticMask.prepare` and trains nothing. The mask travels in the setup
payload (again to a client whose copy is older, when it changes) and is known on both sides
afterwards; a mask computed by clients travels with every message.
Kept values only on both links; removed weights get zero gradients and stay exactly 0.
``dst=rigl|set`` makes the mask dynamic at a fixed size: clients drop and regrow after local
training and the server keeps FedDST's magnitude consensus (``docs/methods/feddst.md``).
Options and every choice: ``docs/methods/static_mask.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from torch import nn

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.kernels.masked import CsrLinears, KernelMode
from sparsefl.kernels.structured import CompactTraining
from sparsefl.masks import Mask
from sparsefl.methods.base import Functional, LocalHooks, Method, mask_setup, schedule_end
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
from sparsefl.pruning import allocate, cosine_fraction, gradual_sparsity, prune, rigl_step, score, set_step
from sparsefl.pruning.allocation import num_kept
from sparsefl.pruning.base import allocation_kwargs, parse_options, resolve_scope
from sparsefl.pruning.dst import consensus_mask, dense_grads, vote_shares
from sparsefl.registry import CRITERIA, METHODS
from sparsefl.rng import derive_seed, torch_gen

Tensor = torch.Tensor
ScoreSource = Literal["server", "client", "federated"]
Schedule = Literal["oneshot", "gradual"]
DstMode = Literal["none", "rigl", "set"]

#: Criteria the gradual schedule may use: they re-score the *trained* aggregate by magnitude.
GRADUAL_CRITERIA: tuple[str, ...] = ("global_magnitude", "magnitude", "lamp")

# Client-state keys (ClientState is a flat dict of tensors).
_ROUND = "static_mask.round."  # + weight name: this round's mask, dropped by upload
_SCORE = "static_mask.score."  # + weight name: the scoring round's upload, dropped by upload
_DST = "static_mask.dst."  # + x / y: the batch of a RigL step's gradient, dropped by upload


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticMaskConfig(MethodConfig):
    """Options of static-mask FedAvg (docs/methods)."""

    sparsity: float = opt(0.9, "fraction of the scope's weights removed (the target with schedule=gradual)", ge=0, lt=1)
    criterion: str = opt("global_magnitude", "pruning criterion choosing the mask", registry=CRITERIA)
    score_source: ScoreSource = opt(
        "server", "data of a data-dependent criterion: server proxy batch, one client, or all round-1 clients"
    )
    score_samples: int = opt(256, "client/federated scoring: at most this many of the client's samples", ge=1)
    schedule: Schedule = opt("oneshot", "oneshot: prune at init; gradual: re-prune the aggregate towards the target")
    prune_every: int = opt(1, "gradual: re-prune every this many rounds", ge=1)
    prune_until: int = opt(10, "gradual: the round at which the target sparsity is reached", ge=1)
    kernel: KernelMode = opt(
        "dense",
        "masked linear layers: dense (masked dense, bit-stable), csr (CSR values), or auto (measured per "
        "layer, see sparsefl.kernels.choice)",
    )

    compact: bool = opt(
        False,
        "train the compacted smaller network of a channel-structured mask (criterion=skeletonization): "
        "removed channels are removed entirely, their bias and BatchNorm parameters zeroed",
    )
    mask_file: str | None = opt(
        None,
        "start from this mask.safetensors (from sparsefl prune --out DIR, or a run folder) instead of the "
        "criterion: it names prunable weights of the model with their shapes; weights it leaves out stay dense",
    )
    min_keep_fraction: float | None = opt(
        None,
        "MT rule: every layer keeps at least this fraction of all scope weights, so no layer is cut off "
        "(global and lamp allocations; default: the criterion's own, 0.05% for global_magnitude)",
        ge=0,
        lt=1,
    )
    dst: DstMode = opt(
        "none",
        "local dynamic sparse training: after local training clients drop their smallest kept weights and regrow "
        "as many by gradient (rigl) or at random (set); the server keeps FedDST's magnitude consensus",
    )
    dst_fraction: float = opt(0.1, "dst: initial share of each layer's kept weights replaced (decays)", gt=0, le=1)
    dst_every: int = opt(5, "dst: drop and regrow every this many rounds", ge=1)
    dst_until: float = opt(0.75, "dst: fraction of the rounds after which the mask stays", gt=0, le=1)

    def __post_init__(self) -> None:
        if self.dst != "none" and (self.schedule != "oneshot" or self.compact):
            raise ConfigError("method.dst", self.dst, "none unless schedule=oneshot and compact=false")
        if self.mask_file is not None and self.schedule != "oneshot":
            raise ConfigError("method.mask_file", self.mask_file, "only with schedule=oneshot (gradual starts dense)")
        cls = CRITERIA.get(self.criterion)
        if self.compact and not cls.structured:
            structured = ", ".join(n for n in CRITERIA.names() if CRITERIA.get(n).structured)
            raise ConfigError("method.compact", True, f"only with a channel-structured criterion ({structured})")
        if self.schedule == "gradual" and self.criterion not in GRADUAL_CRITERIA:
            raise ConfigError(
                "method.criterion", self.criterion, "with schedule=gradual, one of: " + ", ".join(GRADUAL_CRITERIA)
            )
        if self.score_source == "federated" and cls.needs_data and (not cls.has_scores or cls.structured):
            raise ConfigError(
                "method.criterion",
                self.criterion,
                "with score_source=federated, a criterion with unstructured per-weight scores to average",
            )


# --------------------------------------------------------------------------------------------------
# Client hooks
# --------------------------------------------------------------------------------------------------


class StaticMaskHooks(LocalHooks):
    """Masked local SGD: removed weights start at 0 and get zero gradients, so they stay exactly 0.

    Attributes
    ----------
    mask:
        Weight name -> bool tensor (True = kept), on the model's device.
    """

    def __init__(
        self,
        model: nn.Module,
        profile: ModelProfile,
        mask: Mapping[str, Tensor],
        kernel: KernelMode = "dense",
        batch_size: int = 32,
        compact: bool = False,
    ) -> None:
        super().__init__(model, profile)
        state = dict(model.named_parameters())
        missing = [n for n in mask if n not in state]
        if missing:
            raise ValueError(f"static_mask: the mask names {missing[0]!r}, which is not a parameter of the model")
        self._params = {n: state[n] for n in mask}
        self.mask = {n: m.to(device=state[n].device, dtype=torch.bool) for n, m in mask.items()}
        self._fmask = {n: m.to(state[n].dtype) for n, m in self.mask.items()}
        self._density = {
            n: LayerDensity(forward=d, grad_input=d, grad_weight=d)
            for n, m in self.mask.items()
            for d in [float(m.float().mean())]
        }
        self._apply()
        self._compact: CompactTraining | None = None
        if compact:
            # the compacted network trains instead (method.compact): its FLOPs are real, per layer
            # the kept output times the kept input fraction
            self._compact = CompactTraining(model, self.mask, tuple(profile.input_shape))
            self._density = {
                n: LayerDensity(forward=fo * fi, grad_input=fo * fi, grad_weight=fo * fi)
                for n, (fo, fi) in self._compact.densities().items()
            }
            self._params = {}
        # linear layers where a CSR kernel runs train their kept values instead (same update)
        self._csr = CsrLinears(model, self.mask if not compact else {}, kernel, batch_size)
        self._params = {n: p for n, p in self._params.items() if n not in self._csr.layers}

    @torch.no_grad()
    def _apply(self) -> None:
        for n, p in self._params.items():
            p.mul_(self._fmask[n])

    def count_dense_grads(self, names: Sequence[str]) -> None:
        """Count the weight gradient of layers ``names`` dense: a subclass reads it whole (e.g.
        to choose regrown weights), so it is computed whole."""
        for n in names:
            d = self._density[n]
            self._density[n] = LayerDensity(forward=d.forward, grad_input=d.grad_input, grad_weight=1.0)

    def parameters(self) -> list[nn.Parameter]:
        """The model's trainable parameters, with CSR layers' kept values in place of their weights
        (the compact network's parameters with ``compact``)."""
        if self._compact is not None:
            return [p for p in self._compact.small.parameters() if p.requires_grad]
        return self._csr.substitute(super().parameters())

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) if self._compact is None else self._compact.small(x)

    def after_backward(self, step: int) -> None:
        """Zero the gradients of removed weights (no momentum or weight-decay effect on them)."""
        for n, p in self._params.items():
            if p.grad is not None:
                p.grad.mul_(self._fmask[n])

    def after_step(self, step: int) -> None:
        """Nothing: removed weights start at exactly 0 and get 0 gradients, so the local SGD
        (weight decay ``wd * 0``, a momentum buffer that stays 0) leaves them at exactly 0; a
        test checks it. (Re-applying the mask was a pass over every weight per step: 4-6% of a
        resnet18 step on one thread.)"""

    def densities(self) -> Mapping[str, LayerDensity]:
        """Per masked layer, its mask density for all three products (theoretical, see module)."""
        return self._density

    def functional(self) -> Functional | None:
        """Masked SGD as a :class:`Functional` (the mask is the masked weights' gradient factor);
        None where CSR layers or the compact network train instead."""
        if self._compact is not None or self._csr.layers:
            return None
        f = Functional.of_model(self.model, self.parameters(), self._density)
        return replace(f, grad_scale={n: self._fmask[n] for n in self._params})

    def close(self) -> None:
        """Write CSR-trained values (or the compact network) back into the dense weights and
        restore the layers."""
        self._csr.close()
        if self._compact is not None:
            self._compact.close()


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


def consensus_aggregate(state: ServerState, received: Sequence[Received]) -> ServerState:
    """FedDST's server step: each weight averaged over the clients that kept it, then the
    magnitude consensus of the result at the mask's per-layer counts (``received`` non-empty)."""
    assert state.mask is not None
    updates, sizes = [r.update for r in received], [r.num_examples for r in received]
    new = agg.per_coordinate(updates, sizes, state.params, list(state.params))
    votes = vote_shares([u.sent for u in updates], sizes, state.mask)
    counts = {n: int(m.sum()) for n, m in state.mask.items()}
    mask = consensus_mask(new, votes, counts, state.mask.applied(state.params))
    return ServerState(round=state.round + 1, params=mask.applied(new), mask=mask, extra=state.extra)


@METHODS.register("static_mask", StaticMaskConfig, summary="Sparse FedAvg on a server-chosen mask (PruneFL/SSFL-style)")
class StaticMask(Method):
    """Static-mask sparse FedAvg (PruneFL / SSFL-style pruning at initialisation, or gradual
    Global MP on the server); see docs/methods for the algorithm and every choice"""

    config_cls = StaticMaskConfig
    config: StaticMaskConfig

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        cfg = config
        if cfg.schedule == "gradual" and cfg.prune_until > experiment.federation.rounds:
            raise ConfigError(
                "method.prune_until",
                cfg.prune_until,
                f"at most federation.rounds ({experiment.federation.rounds}) so the target is reached",
            )
        self._crit_cls = CRITERIA.get(cfg.criterion)
        #: criterion options the method sets (the MT floor), passed to every pruning call
        self._floor = {} if cfg.min_keep_fraction is None else {"min_keep_fraction": cfg.min_keep_fraction}
        self._crit_opts = parse_options(self._crit_cls.Options, self._floor, "method")
        #: state_dict names the mask covers (the criterion's default scope)
        self.scope: list[str] = resolve_scope(
            spec.template, None, self._crit_opts.keep_first, self._crit_opts.keep_last
        )
        #: the scoring round happens on clients (a data-dependent criterion and a client source)
        self.client_scored: bool = (
            cfg.schedule == "oneshot"
            and cfg.mask_file is None
            and cfg.score_source != "server"
            and bool(self._crit_cls.needs_data)
        )
        # method.mask_file is checked wherever the file exists; the server must have it (clients
        # elsewhere need not: they get the mask in the setup payload)
        self._file_mask: Mask | None = None
        if cfg.mask_file is not None and Path(cfg.mask_file).exists():
            self._file_mask = self._read_mask_file(cfg.mask_file)
        #: ``setup``: the mask is sent in the setup payload (again to a client whose copy is older
        #: when it changes: gradual or dst) and is then known; ``message``: it travels every time
        self.transport: Literal["setup", "message"] = "message" if self.client_scored else "setup"
        #: method.dst's end round (0 without dst); a client-scored mask spends round 1 on scoring
        self._dst_end = 0
        if cfg.dst != "none":
            every, until = ("method.dst_every", cfg.dst_every), ("method.dst_until", cfg.dst_until)
            first = 2 if self.client_scored else 1
            self._dst_end = schedule_end(experiment.federation.rounds, every, until, first=first)

    # ------------------------------------------------------------------------------------ helpers
    def _model_with(self, params: Mapping[str, Tensor]) -> nn.Module:
        model = self.spec.build()
        model.load_state_dict(dict(params), strict=True)
        return model

    def _data_for(self, proxy: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
        """The criterion's data on the server: the proxy batch, or for a data-free criterion
        without one a single zero sample that only tells it the input shape."""
        if proxy is not None:
            return proxy
        if self._crit_cls.needs_data:
            raise ConfigError(
                "method.score_source", "server", f"a server proxy batch for the data-dependent {self.config.criterion}"
            )
        return torch.zeros(1, *self.spec.input_shape), torch.zeros(1, dtype=torch.long)

    def _read_mask_file(self, path: str) -> Mask:
        """The mask of ``method.mask_file`` over the scope: each name it holds must be a prunable
        weight of the model, with its shape; scope weights it does not name are kept whole (a
        mask pruned with ``--keep-first`` or ``--keep-last``). Anything else: ConfigError."""
        key = "method.mask_file"
        try:
            found = Mask.load(path)
        except FileNotFoundError:
            raise ConfigError(key, path, "an existing mask.safetensors (sparsefl prune --out DIR writes one)") from None
        except (OSError, ValueError, TypeError, SafetensorError) as e:
            raise ConfigError(key, path, f"a mask.safetensors of 0/1 tensors ({e})") from None
        shapes = {n: tuple(t.shape) for n, t in self.spec.template.state_dict().items() if n in self.scope}
        if not found:
            raise ConfigError(key, path, "a mask naming at least one prunable weight (this file is empty)")
        for n, m in found.items():
            if n not in shapes:
                some = ", ".join(list(shapes)[:3]) + (", ..." if len(shapes) > 3 else "")
                raise ConfigError(key, path, f"a mask of this model's prunable weights ({some}); it names {n!r}")
            if tuple(m.shape) != shapes[n]:
                raise ConfigError(key, path, f"{n!r} shaped {shapes[n]} as in the model; the file has {tuple(m.shape)}")
        return Mask({n: found[n] if n in found else torch.ones(shapes[n], dtype=torch.bool) for n in self.scope})

    def _gradual_target(self, rnd: int) -> float:
        return gradual_sparsity(rnd, self.config.prune_until, self.config.sparsity)

    def _dst_fraction(self, rnd: int) -> float:
        """``method.dst``: RigL's cosine-decayed share at drop-and-regrow rounds, else 0."""
        cfg = self.config
        return cosine_fraction(rnd, self._dst_end, cfg.dst_fraction) if rnd % cfg.dst_every == 0 else 0.0

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """Prune the initial model on the server (one-shot), take ``mask_file``'s mask, start dense
        (gradual), or leave the mask to round 1's clients (``client``/``federated`` with a
        data-dependent criterion)."""
        cfg = self.config
        if cfg.mask_file is not None:
            mask = self._file_mask if self._file_mask is not None else self._read_mask_file(cfg.mask_file)
            return ServerState(round=0, params=mask.applied(params), mask=mask)
        if cfg.schedule == "gradual":
            return ServerState(round=0, params=params, mask=Mask.ones(params, self.scope))
        if self.client_scored:
            return ServerState(round=0, params=params)
        mask = prune(
            self._model_with(params),
            cfg.criterion,
            cfg.sparsity,
            data=self._data_for(proxy),
            seed=derive_seed(self.experiment.seed, "static_mask", "prune"),
            **self._floor,
        )
        return ServerState(round=0, params=mask.applied(params), mask=mask)

    def setup_payload(self, state: ServerState) -> Update | None:
        """``setup`` transport: the mask (values 1.0 on the kept set, the kept set as ``sent``)."""
        return mask_setup(state) if self.transport == "setup" else None

    def known_masks(self, setup: Update) -> dict[str, Tensor]:
        """``setup`` transport: the mask of the setup payload, shared from then on."""
        if self.transport != "setup":
            return {}
        return {n: setup.sent[n] if n in setup.sent else setup.values[n] != 0 for n in self.scope}

    def task_config(self, state: ServerState, clients: Sequence[int]) -> dict[int, TaskConfig]:
        """A scoring round (no mask yet, scored by clients): ``role=score`` for the clients that
        score (the first sampled one, or all with ``federated``), ``role=idle`` for the rest. With
        ``method.dst``, the drop-and-regrow share of the round as ``dst`` (on its rounds only)."""
        if state.mask is not None and self.config.dst != "none":
            f = self._dst_fraction(state.round + 1)
            return {c: {"dst": f} for c in clients} if f > 0 else {}
        if state.mask is not None or not self.client_scored:
            return {}
        one = self.config.score_source == "client"
        return {c: {"role": "idle" if one and i > 0 else "score"} for i, c in enumerate(clients)}

    def broadcast(self, state: ServerState) -> Update:
        """The masked global parameters, the mask as ``sent`` (dense before the mask exists)."""
        if state.mask is None:
            return Update(values=state.params)
        return Update(values=state.mask.applied(state.params), sent=dict(state.mask.items()))

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """FedAvg on the subnetwork (then the gradual re-pruning), or the scoring round's mask."""
        if state.mask is None:
            return self._aggregate_scores(state, received)
        names = list(state.params)
        if self.config.dst != "none" and received:
            return consensus_aggregate(state, received)
        new = agg.weighted_mean([r.update for r in received], [r.num_examples for r in received], names)
        mask = state.mask
        rnd = state.round + 1
        cfg = self.config
        if (
            cfg.schedule == "gradual"
            and rnd <= cfg.prune_until
            and (rnd % cfg.prune_every == 0 or rnd == cfg.prune_until)
        ):
            target = self._gradual_target(rnd)
            if mask.num_kept() > num_kept(mask.numel(), target):
                mask = prune(
                    self._model_with(mask.applied(new)),
                    cfg.criterion,
                    target,
                    seed=derive_seed(self.experiment.seed, "static_mask", "gradual", rnd),
                    data=self._data_for(None),
                    prev_mask=mask,
                    **self._floor,
                )
        return ServerState(round=rnd, params=mask.applied(new), mask=mask, extra=state.extra)

    def _aggregate_scores(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """The scoring round: the designated client's mask (``client``) or the sample-weighted
        mean of the clients' scores, allocated (``federated``). No usable upload: no mask yet."""
        cfg = self.config
        mask: Mask | None = None
        if cfg.score_source == "client":
            for r in sorted(received, key=lambda r: r.client_id):
                if all(n in r.update.sent for n in self.scope):
                    mask = Mask({n: r.update.sent[n] for n in self.scope})
                    break
        else:
            scorers = [r for r in received if all(n in r.update.values for n in self.scope)]
            if scorers:
                total = float(sum(r.num_examples for r in scorers))
                mean = {
                    n: sum(r.update.values[n].to(torch.float64) * (r.num_examples / total) for r in scorers)
                    for n in self.scope
                }
                mask = allocate(mean, cfg.sparsity, **allocation_kwargs(self._crit_opts))  # type: ignore[arg-type]
        params = state.params if mask is None else mask.applied(state.params)
        return ServerState(round=state.round + 1, params=params, mask=mask, extra=state.extra)

    def update_norm(self, state: ServerState, received: Received) -> float:
        """Scoring-round uploads are scores or masks, not weights: never rejected as outliers."""
        if state.mask is None:
            return 0.0
        return super().update_norm(state, received)

    def eval_params(self, state: ServerState) -> StateDict:
        """The masked global parameters (the plain initial ones before a scoring round ends)."""
        return state.params if state.mask is None else state.mask.applied(state.params)

    # ---------------------------------------------------------------------------------- client
    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Load the (masked) parameters; the round's mask is the downlink's ``sent`` masks (a
        scoring round's downlink has none)."""
        model.load_state_dict(down.values, strict=True)
        out = {k: v for k, v in client_state.items() if not k.startswith((_ROUND, _SCORE, _DST))}
        if all(n in down.sent for n in self.scope):
            for n in self.scope:
                out[_ROUND + n] = down.sent[n]
        elif not self.client_scored:
            raise ValueError("static_mask: the downlink carries no mask for the masked tensors")
        return out

    def prepare(self, model: nn.Module, data: ClientData, client_state: ClientState, ctx: LocalContext) -> ClientState:
        """A scoring client's mask (``client``) or scores (``federated``), computed at the received
        weights on up to ``score_samples`` of its samples, in its local loop's shuffled order.
        A ``dst=rigl`` round sets aside one batch for the gradient that chooses the regrown weights."""
        if float(ctx.config.get("dst", 0.0)) > 0 and self.config.dst == "rigl":
            gen = torch_gen(ctx.seed, "static_mask", "dst", ctx.client_id, ctx.round)
            take = torch.randperm(len(data.x), generator=gen)[: max(1, ctx.local.batch_size)]
            return {**client_state, _DST + "x": data.x[take], _DST + "y": data.y[take]}
        if ctx.config.get("role") != "score":
            return client_state
        cfg = self.config
        take = torch.randperm(len(data.x), generator=torch_gen(ctx.seed, "local", ctx.client_id, ctx.round))
        take = take[: cfg.score_samples]
        sample = (data.x[take], data.y[take])
        seed = derive_seed(ctx.seed, "static_mask", "score", ctx.client_id, ctx.round)
        if cfg.score_source == "client":
            found = dict(prune(model, cfg.criterion, cfg.sparsity, data=sample, seed=seed, **self._floor).items())
        else:
            found = score(model, cfg.criterion, data=sample, seed=seed)
        return {**client_state, **{_SCORE + n: found[n] for n in self.scope}}

    @property
    def why_not_batched(self) -> str | None:
        """Batched with the dense masked kernel only."""
        cfg = self.config
        if cfg.kernel != "dense" or cfg.compact:
            return (
                f"static_mask: method.kernel={cfg.kernel}, method.compact={str(cfg.compact).lower()}; the batched "
                "executor runs the dense masked kernel only (kernel=dense, compact=false)"
            )
        return None

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks | None:
        """Masked SGD; a scoring round trains nothing."""
        if "role" in ctx.config:
            return None
        return StaticMaskHooks(
            model,
            self.profile,
            {n: client_state[_ROUND + n] for n in self.scope},
            self.config.kernel,
            min(ctx.local.batch_size, max(1, ctx.num_examples)),
            compact=self.config.compact,
        )

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Kept values of the masked tensors (dense small tensors), or the scoring round's mask
        (values 1.0 on the kept set, the kept set as ``sent``) or scores."""
        state = {k: v for k, v in client_state.items() if not k.startswith((_ROUND, _SCORE, _DST))}
        role = ctx.config.get("role")
        if role is not None:
            found = {n: client_state[_SCORE + n] for n in self.scope if _SCORE + n in client_state}
            if role == "idle" or not found:
                return Update(values={}), state
            values = {n: v.to(down.values[n].dtype) for n, v in found.items()}
            sent = found if self.config.score_source == "client" else {}
            return Update(values=values, sent=sent), state
        values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sent = {n: client_state[_ROUND + n] for n in self.scope}
        fraction = float(ctx.config.get("dst", 0.0))
        if fraction > 0:  # method.dst: this client's drop-and-regrow step, after training
            new = self._dst_step(model, Mask(sent), client_state, ctx, fraction)
            sent = {n: new[n].to(values[n].device) for n in self.scope}
        for n in self.scope:
            values[n] = values[n] * sent[n].to(values[n].dtype)
        return Update(values=values, sent=sent), state

    def _dst_step(
        self, model: nn.Module, mask: Mask, client_state: ClientState, ctx: LocalContext, fraction: float
    ) -> Mask:
        """``method.dst``: drop the smallest kept weights, regrow by dense gradient (``rigl``, on
        the batch ``prepare`` set aside) or at random (``set``, the client's own generator)."""
        weights = {n: p.detach() for n, p in model.named_parameters() if n in mask}
        if self.config.dst == "rigl":
            grads = dense_grads(model, client_state[_DST + "x"], client_state[_DST + "y"], self.scope)
            return rigl_step(mask, weights, grads, fraction)
        return set_step(mask, weights, fraction, torch_gen(ctx.seed, "static_mask", "set", ctx.client_id, ctx.round))
