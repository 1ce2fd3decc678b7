"""Static-mask sparse FedAvg: the server fixes one mask, the clients train only the kept weights.

Registered as ``method.name=static_mask``. The family of "prune once, then federate a fixed
subnetwork" methods: PruneFL's initial pruning at one selected client (Jiang et al., TNNLS 2022,
arXiv 1909.12326), SSFL's federated saliency averaged into one global mask at initialisation
(Huang et al., TMLR; code riohib/SSFL) and pruning-at-initialisation on the server with a proxy
batch (METHODS.md section 5.3: "run it once on the server with a proxy batch, or on one selected
client ... then fix the mask for federated training, as in SSFL"). Any criterion registered in
:data:`sparsefl.registry.CRITERIA` chooses the weights (SynFlow, ProsPr, SNIP, GraSP, Global MP,
LAMP, random, ...); ``method.schedule=gradual`` instead prunes the aggregated model step by step
(gradual Global MP, Gupta et al., arXiv 2209.14624, on Zhu & Gupta's cubic schedule).

The round
---------
1. **Mask.** ``method.criterion`` prunes the freshly initialised global model to exactly
   ``method.sparsity`` of the scope (the criterion's default scope: every Conv/Linear weight; its
   default allocation, e.g. one global threshold with a per-layer minimum for SynFlow, ProsPr
   and Global MP, uniform per layer for ``random``). Where the data comes from
   (``method.score_source``, for data-dependent criteria only; data-free ones such as SynFlow,
   magnitude and random always run on the server, where every source gives the same mask):

   * ``server``: the server's small proxy batch (``init_state``'s ``proxy``: the runner passes 256
     training samples). The mask exists before round 1.
   * ``client`` (PruneFL-style): round 1 is a *scoring round*. The designated client, the first
     client sampled for that round (``sample_clients(seed, round, ..., attempt=0)[0]``, which
     every client can compute from the config), runs the full :func:`~sparsefl.pruning.prune` on
     up to ``method.score_samples`` of its own training samples and uploads the mask (sent
     mask = the kept set, values 1.0: the ``sign``/bitmask layouts make it about one bit per
     weight; counted as uplink bytes). The other sampled clients upload an empty update.
   * ``federated`` (SSFL-style): every client of the scoring round computes the criterion's
     one-shot scores (:func:`~sparsefl.pruning.score`) on up to ``method.score_samples`` of its
     samples at the received initial weights and uploads them (dense float tensors in place of
     the scope weights, counted as uplink bytes); the server takes their sample-weighted mean
     and allocates it (:func:`~sparsefl.pruning.allocate`, the criterion's allocation options).
     SSFL averages raw ``|g * w|`` saliencies likewise.

   A scoring round trains nothing: the clients' local loop runs with a frozen stand-in optimiser
   parameter and constant logits (the interface offers no other way to skip it), which only
   serves to hand the client's batches to the hooks; its training FLOPs are reported as 0
   (the scoring passes themselves are not counted by the one FLOP convention of the local loop).
   If no usable score arrives (the designated client failed), the next round scores again.
   The global parameters are masked as soon as the mask exists; training starts the round after.
2. **Downlink**: the masked global parameters with the mask as their ``sent`` masks, so only
   kept values of masked tensors travel (plus the dense small tensors: biases, BatchNorm).
3. **Local training** (:class:`StaticMaskHooks`): the usual SGD loop; after ``backward`` the
   gradients of removed weights are zeroed (so neither momentum nor weight decay moves them:
   both act on a zero weight with a zero gradient), and after every optimizer step the mask is
   re-applied, so removed weights stay exactly 0.
4. **Upload**: the local parameters with the mask as ``sent``: kept values only, dense small
   tensors.
5. **Aggregation**: sample-weighted FedAvg (:func:`sparsefl.fl.aggregate.weighted_mean`; every
   client shares the mask, so it is plain FedAvg on the subnetwork), then the mask re-applied.
   With ``schedule=gradual`` the server then re-prunes the aggregate every ``method.prune_every``
   rounds (and at ``method.prune_until``) with ``method.criterion`` (a magnitude criterion) to
   ``gradual_sparsity(round, prune_until, sparsity)`` with ``prev_mask`` = the current mask, so
   the mask only shrinks and reaches the target exactly at ``prune_until``.
6. **Evaluation** (:meth:`StaticMask.eval_params`) and the final ``mask.safetensors``: the masked
   global parameters and :attr:`ServerState.mask`.

Mask transport (bytes)
----------------------
* ``setup`` (one-shot schedule with the mask fixed before round 1: ``score_source=server`` or a
  data-free criterion): the mask is the setup payload (values 1.0 on the kept set), sent once on
  each client's first participation and counted once per client; afterwards it is a *known* mask
  on both sides (:meth:`StaticMask.known_masks`, :meth:`StaticMask.client_known_masks`), so each
  masked tensor costs its kept values plus a 4-byte fingerprint on both links.
* ``message`` (``schedule=gradual``, or a mask computed by clients in round 1): the mask travels
  as the ``sent`` mask of every downlink and uplink (about ``H(density)`` bits per weight with the
  entropy-coded layouts; counted every time). Reason: the server loop sends the setup payload
  only on a client's first participation and marks every participant of a round as initialised,
  so a mask that changes, or that is fixed after round 1, could not reach the clients that
  already participated. The change to :mod:`sparsefl.fl.server` that would let these cases use
  ``setup`` transport too is described in the report accompanying this module (re-send the setup
  payload when it changes).

Choices (each an option)
------------------------
* ``method.criterion=global_magnitude``: Global MP is data-free, cheap, needs no proxy data, and
  is the only default that also serves the gradual schedule. SynFlow, ProsPr, SNIP, GraSP, LAMP,
  ``random`` (the baseline) and every other registered criterion with a mask are accepted.
  Criterion options are the criterion's defaults (SynFlow 100 iterations; ProsPr 3 inner steps,
  ``full`` meta-gradients; MT minimum of one weight per layer, Global MP 0.05%).
* ``method.score_source=server``; ``method.score_samples=256``: client-side scoring uses at most
  this many of the client's training samples (the first ones its shuffled local loop visits).
* ``method.schedule=oneshot``; ``gradual`` with ``method.prune_every=1``, ``method.prune_until=10``
  (the round at which the target is reached; at most ``federation.rounds``).
* The random seed of every criterion call derives from ``(seed, "static_mask", ...)``.
* ``method.compact=false``: with a channel-structured criterion (``skeletonization``),
  ``compact=true`` trains the compacted smaller network (:class:`sparsefl.kernels.structured.
  CompactTraining`; about 5x faster per step at 10% of resnet18's parameters, measured by
  ``benchmarks/speed.py --only structured``). A removed channel is then removed entirely: its
  bias and BatchNorm scale and shift are zeroed in the uploaded model, so nothing of it reaches
  the next layer, which the masked big model (``compact=false``) lets through as a constant
  ``relu(beta)``. The compaction (an ``fx`` trace, 0.2-0.7 s) runs once per architecture and mask
  in a process; each client round then only gathers its kept channels into the compact network.

FLOPs
-----
:meth:`StaticMaskHooks.densities` reports, per masked layer and per step, ``LayerDensity(forward =
d, grad_input = d, grad_weight = d)`` with ``d`` the layer's mask density: the work a sparse kernel
would do (the products skip removed weights, and a masked weight needs no gradient). The numbers
are **theoretical**: here the products run densely on masked tensors, except for linear layers
trained with ``method.kernel=csr`` (or ``auto`` where it measures faster): those run CSR kernels
that skip the removed weights (:mod:`sparsefl.kernels.masked`; convolutions always run masked
dense, the only kind that is not slower on CPU). With ``method.compact`` the counts are those of
the compact network that runs: per layer (masked or not) the kept output times the kept input
channel fraction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.fl import aggregate as agg
from sparsefl.fl.messages import ClientState
from sparsefl.fl.sampling import sample_clients
from sparsefl.kernels.masked import CsrLinears, KernelMode
from sparsefl.kernels.structured import CompactTraining
from sparsefl.masks import Mask
from sparsefl.methods.base import LocalContext, LocalHooks, Method, ModelSpec, Received, ServerState, StateDict
from sparsefl.pruning import allocate, gradual_sparsity, prune, score
from sparsefl.pruning.allocation import num_kept
from sparsefl.pruning.base import allocation_kwargs, parse_options, resolve_scope
from sparsefl.registry import CRITERIA, METHODS
from sparsefl.rng import derive_seed

Tensor = torch.Tensor
ScoreSource = Literal["server", "client", "federated"]
Schedule = Literal["oneshot", "gradual"]

#: Criteria the gradual schedule may use: they re-score the *trained* aggregate by magnitude.
GRADUAL_CRITERIA: tuple[str, ...] = ("global_magnitude", "magnitude", "lamp")

# Client-state keys (ClientState is a flat dict of tensors).
_KNOWN = "static_mask.known."  # + weight name: the setup mask (setup transport), kept across rounds
_ROUND = "static_mask.round."  # + weight name: this round's mask, dropped by upload
_SCORING = "static_mask.scoring"  # this round is a scoring round (dropped by upload)
_SCORE_X = "static_mask.score_x"  # the client's scoring sample (dropped by upload)
_SCORE_Y = "static_mask.score_y"


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticMaskConfig(MethodConfig):
    """Options of static-mask FedAvg (see the module docstring for what each one means and why)."""

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

    def __post_init__(self) -> None:
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

    def close(self) -> None:
        """Write CSR-trained values (or the compact network) back into the dense weights and
        restore the layers."""
        self._csr.close()
        if self._compact is not None:
            self._compact.close()


class ScoringHooks(LocalHooks):
    """The scoring round's stand-in for training: nothing is trained; the batches the loop draws
    are collected (up to ``limit`` samples) into ``client_state`` for :meth:`StaticMask.upload`.

    The optimiser gets one frozen stand-in parameter and the loss is computed on constant logits,
    so no forward or backward pass of the model runs (0 effective FLOPs are reported).
    """

    def __init__(
        self, model: nn.Module, profile: ModelProfile, client_state: ClientState, num_classes: int, limit: int
    ) -> None:
        super().__init__(model, profile)
        self._state = client_state
        self._limit = limit
        self._stand_in = nn.Parameter(torch.zeros(()))
        self._num_classes = num_classes
        self._xs: list[Tensor] = []
        self._ys: list[Tensor] = []
        self._seen = 0

    def parameters(self) -> list[nn.Parameter]:
        return [self._stand_in]

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros(len(x), self._num_classes, dtype=torch.float32) + self._stand_in

    def loss(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        if self._seen < self._limit:
            take = min(len(x), self._limit - self._seen)
            self._xs.append(x[:take].detach().clone())
            self._ys.append(y[:take].detach().clone())
            self._seen += take
            self._state[_SCORE_X] = torch.cat(self._xs)
            self._state[_SCORE_Y] = torch.cat(self._ys)
        return F.cross_entropy(logits.float(), y)

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            self._stand_in.zero_()

    def densities(self) -> Mapping[str, LayerDensity]:
        zero = LayerDensity(forward=0.0, grad_input=0.0, grad_weight=0.0)
        return {layer.name: zero for layer in self.profile.layers}


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@METHODS.register("static_mask", StaticMaskConfig, summary="Sparse FedAvg on a server-chosen mask (PruneFL/SSFL-style)")
class StaticMask(Method):
    """Static-mask sparse FedAvg (PruneFL / SSFL-style pruning at initialisation, or gradual
    Global MP on the server); see the module docstring for the algorithm and every choice."""

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
        self._crit_opts = parse_options(self._crit_cls.Options, {}, cfg.criterion)
        #: state_dict names the mask covers (the criterion's default scope)
        self.scope: list[str] = resolve_scope(
            spec.template, None, self._crit_opts.keep_first, self._crit_opts.keep_last
        )
        #: the scoring round happens on clients (a data-dependent criterion and a client source)
        self.client_scored: bool = (
            cfg.schedule == "oneshot" and cfg.score_source != "server" and bool(self._crit_cls.needs_data)
        )
        #: ``setup``: the mask is sent once and is then known; ``message``: it travels every time
        self.transport: Literal["setup", "message"] = (
            "setup" if cfg.schedule == "oneshot" and not self.client_scored else "message"
        )

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

    def _gradual_target(self, rnd: int) -> float:
        return gradual_sparsity(rnd, self.config.prune_until, self.config.sparsity)

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """Prune the initial model on the server (one-shot), start dense (gradual), or leave the
        mask to round 1's clients (``client``/``federated`` with a data-dependent criterion)."""
        cfg = self.config
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
        )
        return ServerState(round=0, params=mask.applied(params), mask=mask)

    def setup_payload(self, state: ServerState) -> Update | None:
        """``setup`` transport: the mask (values 1.0 on the kept set, the kept set as ``sent``)."""
        if self.transport != "setup" or state.mask is None:
            return None
        return Update(
            values={n: m.to(state.params[n].dtype) for n, m in state.mask.items()}, sent=dict(state.mask.items())
        )

    def known_masks(self, state: ServerState) -> dict[str, Tensor]:
        """``setup`` transport: the mask (the receiver got it in the setup payload)."""
        if self.transport != "setup" or state.mask is None:
            return {}
        return dict(state.mask.items())

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
    def on_setup(self, setup: Update, client_state: ClientState) -> ClientState:
        """Keep the setup mask: it is the known mask of every later message."""
        out = dict(client_state)
        for n in self.scope:
            out[_KNOWN + n] = setup.sent[n] if n in setup.sent else setup.values[n] != 0
        return out

    def client_known_masks(self, client_state: ClientState) -> dict[str, Tensor]:
        """``setup`` transport: the mask from the setup payload."""
        if self.transport != "setup":
            return {}
        return {n: client_state[_KNOWN + n] for n in self.scope if _KNOWN + n in client_state}

    def receive(self, model: nn.Module, down: Update, client_state: ClientState) -> ClientState:
        """Load the (masked) parameters; the round's mask is the downlink's ``sent`` masks, and a
        downlink without them means a scoring round."""
        model.load_state_dict(down.values, strict=True)
        out = {k: v for k, v in client_state.items() if not k.startswith((_ROUND, _SCORING, _SCORE_X, _SCORE_Y))}
        if all(n in down.sent for n in self.scope):
            for n in self.scope:
                out[_ROUND + n] = down.sent[n]
        elif self.client_scored:
            out[_SCORING] = torch.tensor(True)
        else:
            raise ValueError("static_mask: the downlink carries no mask for the masked tensors")
        return out

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks:
        """Masked SGD, or the scoring round's sample collection."""
        if _SCORING in client_state:
            return ScoringHooks(model, self.profile, client_state, self.spec.num_classes, self.config.score_samples)
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
        """Kept values of the masked tensors (dense small tensors), or the scoring round's
        mask/scores computed at the received weights on the collected samples."""
        state = {k: v for k, v in client_state.items() if not k.startswith((_ROUND, _SCORING, _SCORE_X, _SCORE_Y))}
        if _SCORING in client_state:
            return self._score_upload(down, client_state, ctx), state
        values = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sent = {n: client_state[_ROUND + n] for n in self.scope}
        for n in self.scope:
            values[n] = values[n] * sent[n].to(values[n].dtype)
        return Update(values=values, sent=sent), state

    def _score_upload(self, down: Update, client_state: ClientState, ctx: LocalContext) -> Update:
        cfg = self.config
        fed = self.experiment.federation
        if _SCORE_X not in client_state:  # no usable batch (a one-sample client)
            return Update(values={})
        data = (client_state[_SCORE_X], client_state[_SCORE_Y])
        seed = derive_seed(ctx.seed, "static_mask", "score", ctx.client_id, ctx.round)
        model = self._model_with(down.values)
        if cfg.score_source == "client":
            designated = sample_clients(self.experiment.seed, ctx.round, fed.num_clients, fed.clients_per_round, 0)[0]
            if ctx.client_id != designated:
                return Update(values={})
            mask = prune(model, cfg.criterion, cfg.sparsity, data=data, seed=seed)
            return Update(values={n: m.to(down.values[n].dtype) for n, m in mask.items()}, sent=dict(mask.items()))
        scores = score(model, cfg.criterion, data=data, seed=seed)
        return Update(values={n: scores[n].to(down.values[n].dtype) for n in self.scope})
