"""HideNseek: server-side SynFlow pruning at initialisation and a learned sign supermask.

A labelled reconstruction of HideNseek (Vallapuram et al., "HideNseek: Federated Lottery Ticket
via Server-side Pruning and Sign Supermask", arXiv 2206.04385), which has no public code: the
server prunes the randomly initialised model once with SynFlow; the kept weights stay frozen and
clients learn a sign supermask in {-1, +1} over them (scores trained through a straight-through
estimator), uploading one bit per kept weight; the server takes a majority vote of the signs.

A client's flips are mostly its own (non-IID data), so a vote keeps few of them; each client
therefore keeps its score magnitudes across rounds (``carry=client``), re-signed to the global
signs, so evidence near the sign boundary is not thrown away each round. The server records the
fraction of flips that survive the vote (``extra["stats/flip_survival"]``). Every choice beyond
the abstract is an option and is listed, with the study behind the defaults, in
``docs/methods/hidenseek.md``; no number of the paper is claimed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.masks import Mask, default_scope
from sparsefl.methods.base import Functional, LocalHooks, Method
from sparsefl.models import ModelSpec
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.messages import KNOWN, ClientState, LocalContext, Received, ServerState, StateDict
from sparsefl.pruning import prune
from sparsefl.registry import METHODS
from sparsefl.rng import derive_seed, torch_gen

Tensor = torch.Tensor
_BN = nn.modules.batchnorm._BatchNorm


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HideNseekConfig(MethodConfig):
    """Options of HideNseek (docs/methods)."""

    sparsity: float = opt(0.9, "fraction of the pruning scope removed by SynFlow at initialisation", ge=0, lt=1)
    synflow_iterations: int = opt(100, "SynFlow iterations n (exponential schedule rho**(j/n))", ge=1)
    min_keep_fraction: float = opt(0.0, "SynFlow MT rule: fraction of the scope every layer keeps at least", ge=0, lt=1)
    prune_first: bool = opt(True, "SynFlow may prune the input layer (else it stays dense, still sign-trained)")
    prune_classifier: bool = opt(True, "SynFlow may prune the classifier (else dense, still sign-trained)")
    weight_init: Literal["kaiming_normal", "signed_constant", "model"] = opt(
        "kaiming_normal", "random W0 of every Conv/Linear weight: N(0, 2/fan_in), +-sqrt(2/fan_in), or the model's"
    )
    rescale: bool = opt(False, "multiply each layer's kept weights by 1/sqrt(layer density) after pruning")
    score_init: Literal["constant", "abs_normal"] = opt(
        "abs_normal", "score magnitude at the start of local training: score_scale, or score_scale*|N(0,1)|"
    )
    score_scale: float = opt(0.5, "the constant initial |score|, or the scale of |N(0,1)|", gt=0)
    ste: Literal["clipped", "identity"] = opt(
        "clipped", "straight-through estimator of sign(s): identity, or identity where |s| <= ste_clip"
    )
    ste_clip: float = opt(1.0, "clipped STE: the gradient passes where |s| <= ste_clip", gt=0)
    score_lr: float = opt(5.0, "learning rate of the scores at round 1 (follows local.lr's schedule)", gt=0)
    train_bn: bool = opt(False, "also train and send BatchNorm affine parameters and Conv/Linear biases")
    vote: Literal["weighted", "unweighted"] = opt(
        "weighted", "weight each client's vote (or scores) by its samples, or one vote per client"
    )
    upload: Literal["sign", "score"] = opt(
        "sign", "sign: 1 bit per kept weight, majority vote; score: float32 scores, the sign of their mean"
    )
    carry: Literal["none", "client", "server"] = opt(
        "client",
        "where scores persist across rounds: none (fresh from the global signs), client (a client's "
        "magnitudes, clipped to ste_clip and re-signed to the global signs), server (the mean scores, "
        "sent down; upload=score)",
    )
    personalize: bool = opt(False, "clients keep their scores across rounds and are validated on their own signs")

    def __post_init__(self) -> None:
        if self.carry == "server" and self.upload != "score":
            raise ConfigError("method.carry", self.carry, "'none' or 'client' unless method.upload='score'")
        if self.ste == "clipped" and self.score_init == "constant" and self.score_scale > self.ste_clip:
            raise ConfigError(
                "method.score_scale",
                self.score_scale,
                f"<= method.ste_clip={self.ste_clip:g} with ste=clipped and score_init=constant "
                "(scores starting outside the clip never get a gradient)",
            )


# --------------------------------------------------------------------------------------------------
# Sign straight-through estimator and the vote
# --------------------------------------------------------------------------------------------------


def hard_sign(s: Tensor) -> Tensor:
    """``+1`` where ``s >= 0``, ``-1`` where ``s < 0`` (never 0), in ``s``'s dtype."""
    return torch.where(s >= 0, torch.ones_like(s), -torch.ones_like(s))


class SignSTE(torch.autograd.Function):
    """``sign(s)`` forward (:func:`hard_sign`); straight-through backward.

    ``forward(s, clip)``; backward returns ``grad`` (``clip is None``: identity) or
    ``grad * 1[|s| <= clip]`` (clipped, as the hard-tanh STE of BinaryConnect / XNOR-Net).
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, clip: float | None) -> Tensor:  # type: ignore[override]
        ctx.clip = clip
        if clip is not None:
            ctx.save_for_backward(s)
        return hard_sign(s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if ctx.clip is None:
            return grad, None
        (s,) = ctx.saved_tensors
        return grad * (s.abs() <= ctx.clip).to(grad.dtype), None


def sign_ste(s: Tensor, clip: float | None) -> Tensor:
    """Apply :class:`SignSTE` (``clip=None``: identity STE)."""
    return SignSTE.apply(s, clip)


def sign_vote(prev: Tensor, votes: Sequence[Tensor], weights: Sequence[int]) -> Tensor:
    """Weighted majority of sign votes; a tie keeps ``prev``.

    ``v = sum_k weights[k] * sign(votes[k])`` in int64 (exact), result ``sign(v)`` where
    ``v != 0`` and ``prev`` where ``v == 0`` (ties, or no vote at a coordinate: a 0 in a vote
    tensor, e.g. an unsent coordinate, casts no vote). Returned in ``prev``'s dtype.
    """
    v = torch.zeros(prev.shape, dtype=torch.int64)
    for u, w in zip(votes, weights, strict=True):
        v += torch.sign(u).to(torch.int64) * int(w)
    one = torch.ones_like(prev)
    return torch.where(v > 0, one, torch.where(v < 0, -one, prev))


def flip_counts(prev: Tensor, new: Tensor, votes: Sequence[Tensor], kept: Tensor) -> tuple[int, int]:
    """``(flips, survived)``: kept coordinates where a client's vote differs from ``prev``,
    summed over the clients, and how many of those the new global signs ``new`` took."""
    changed = (new != prev) & kept
    flips = survived = 0
    for u in votes:
        f = (hard_sign(u) != prev) & kept
        flips += int(f.sum())
        survived += int((f & changed).sum())
    return flips, survived


def flip_stats(state: ServerState) -> dict[str, list[float]]:
    """HideNseek's per-round flip statistics in ``state`` (one entry per aggregated round):
    ``flip_survival``, the fraction of the clients' sign flips (against the round's global signs)
    that the new global signs kept; ``client_flips``, the mean fraction of kept weights a client
    flipped; ``sign_change``, the fraction of kept weights whose global sign changed."""
    return {k[len("stats/") :]: v.tolist() for k, v in state.extra.items() if k.startswith("stats/")}


# --------------------------------------------------------------------------------------------------
# Tensor roles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roles:
    """Which state_dict entries play which part (all lists of state_dict names).

    Attributes
    ----------
    scope:
        Sign scope: every Conv/Linear weight (frozen magnitudes, learned signs).
    prune_scope:
        The part of ``scope`` SynFlow prunes.
    trained:
        Other parameters the clients train and send each round (``train_bn``: BatchNorm affine
        parameters and Conv/Linear biases; else empty).
    stats:
        BatchNorm buffers (running statistics, counters): sent and averaged each round.
    frozen:
        Everything else, sent once in the setup payload, plus ``scope`` (``W0``).
    """

    scope: list[str]
    prune_scope: list[str]
    trained: list[str]
    stats: list[str]
    frozen: list[str]

    @property
    def per_round(self) -> list[str]:
        """Non-sign tensors sent both ways every round."""
        return self.trained + self.stats


def tensor_roles(model: nn.Module, cfg: HideNseekConfig) -> Roles:
    """The :class:`Roles` of ``model``'s tensors under ``cfg``."""
    scope = default_scope(model)
    if not scope:
        raise ConfigError("model", type(model).__name__, "a model with at least one Conv or Linear weight (hidenseek)")
    prune_scope = default_scope(model, keep_first=not cfg.prune_first, keep_last=not cfg.prune_classifier)
    trained: list[str] = []
    stats: list[str] = []
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, _BN):
            stats += [prefix + n for n, b in mod.named_buffers(recurse=False) if b is not None]
            if cfg.train_bn:
                trained += [prefix + n for n, _ in mod.named_parameters(recurse=False)]
        elif cfg.train_bn and isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            if getattr(mod, "bias", None) is not None:
                trained.append(prefix + "bias")
    sent = set(scope) | set(trained) | set(stats)
    frozen = [k for k in model.state_dict() if k not in sent]
    return Roles(scope, prune_scope, trained, stats, frozen)


def effective_params(frozen: Mapping[str, Tensor], signs: Mapping[str, Tensor]) -> StateDict:
    """``frozen`` with every tensor named in ``signs`` replaced by ``frozen * sign`` (the frozen
    scope weights are already masked, so the result is ``M * W0 * sign``)."""
    out = dict(frozen)
    for k, g in signs.items():
        out[k] = frozen[k] * g.to(frozen[k].dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Client hooks
# --------------------------------------------------------------------------------------------------


class SignedWeightFn(torch.autograd.Function):
    """``W_eff = W0 * sign_ste(s)`` on the kept positions of a weight, in two passes.

    ``forward(s, w0, neg_w0, flat, shape, clip)``: ``s``, ``w0`` and ``neg_w0 = -w0`` are 1-D over
    the kept positions (``flat``: their flat indices in the dense weight; ``None`` = every
    position, in order). The result is the dense ``shape`` weight, ``where(s >= 0, w0, -w0)`` at
    the kept positions and 0 elsewhere. Backward is :class:`SignSTE`'s through the product:
    ``dL/ds = (dL/dW_eff * w0)[flat]``, times ``1[|s| <= clip]`` when clipped. The same numbers
    as ``w0 * sign_ste(s)`` on the dense tensors, without a pass over the pruned positions.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        s: Tensor,
        w0: Tensor,
        neg_w0: Tensor,
        flat: Tensor | None,
        shape: torch.Size,
        clip: float | None,
    ) -> Tensor:
        vals = torch.where(s >= 0, w0, neg_w0)
        ctx.flat, ctx.clip = flat, clip
        ctx.save_for_backward(w0, s if clip is not None else None)
        if flat is None:
            return vals.view(shape)
        out = torch.zeros(shape.numel(), dtype=vals.dtype)
        return out.index_copy_(0, flat, vals).view(shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w0, s = ctx.saved_tensors
        g = grad.reshape(-1)
        if ctx.flat is not None:
            g = g.index_select(0, ctx.flat)
        gs = g * w0
        if ctx.clip is not None:
            gs = gs * (s.abs() <= ctx.clip).to(gs.dtype)
        return gs, None, None, None, None, None


class SignSupermaskHooks(LocalHooks):
    """Local training of the sign scores: the forward runs the model functionally with
    ``W_eff = W0 * sign_ste(s)``; only the scores (and, with ``train_bn``, the trained tensors)
    are optimised. Every other parameter gets ``requires_grad=False`` until :meth:`close`, which
    restores the flags and writes the trained scores into ``state`` as ``score/{name}``.

    Speed: a pruned position's score never matters (its ``W0`` is 0, so it gets no gradient and
    is never uploaded), so with ``masks`` given only the kept positions' scores are trained
    (:class:`SignedWeightFn`); the pruned positions keep their initial scores (weight decay no
    longer shrinks them, which never mattered: they are unused and never sent). The kept
    positions' scores, the gradients and the model are the same as training every position.

    Parameters
    ----------
    model:
        The client's model, holding ``W0`` (already masked) in its scope weights.
    scores:
        Initial scores per scope name (copied).
    state:
        The round's working client state; receives the trained scores on :meth:`close`.
    masks:
        The kept positions per scope name (``None`` or a missing name: every position).
    """

    def __init__(
        self,
        model: nn.Module,
        profile: ModelProfile,
        roles: Roles,
        cfg: HideNseekConfig,
        scores: Mapping[str, Tensor],
        grad_scale: float,
        densities: Mapping[str, LayerDensity],
        state: ClientState,
        masks: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(model, profile)
        self.cfg = cfg
        self.roles = roles
        self.state = state
        self.grad_scale = grad_scale
        self.clip = cfg.ste_clip if cfg.ste == "clipped" else None
        named = dict(model.named_parameters())
        self._full = {k: v.detach().clone() for k, v in scores.items()}
        self._flat: dict[str, Tensor | None] = {}
        self.scores: dict[str, nn.Parameter] = {}
        self._w0: dict[str, tuple[Tensor, Tensor]] = {}
        for k, s0 in self._full.items():
            m = None if masks is None else masks.get(k)
            flat = None if m is None or bool(m.all()) else torch.nonzero(m.reshape(-1)).flatten()
            w0 = named[k].detach().reshape(-1)
            if flat is not None:
                w0 = w0.index_select(0, flat)
                s0 = s0.reshape(-1).index_select(0, flat)
            self._flat[k] = flat
            self.scores[k] = nn.Parameter(s0.reshape(-1).clone())
            self._w0[k] = (w0.clone(), -w0)
        self._densities = dict(densities)
        trained = set(roles.trained)
        self._before = {n: p.requires_grad for n, p in named.items()}
        for n, p in named.items():
            p.requires_grad_(n in trained)
        self._trained = [named[n] for n in roles.trained]

    def parameters(self) -> list[nn.Parameter]:
        """The scores (kept positions only where a mask was given), then the trained tensors."""
        return [*self.scores.values(), *self._trained]

    def effective_weights(self) -> dict[str, Tensor]:
        """``W0 * sign_ste(s)`` per scope name (differentiable in the scores)."""
        return {
            k: SignedWeightFn.apply(s, *self._w0[k], self._flat[k], self._full[k].shape, self.clip)
            for k, s in self.scores.items()
        }

    def forward(self, x: Tensor) -> Tensor:
        return functional_call(self.model, self.effective_weights(), (x,))

    def after_backward(self, step: int) -> None:
        # score_lr / local.lr: SGD (with momentum) is linear in the gradient, so this is exactly a
        # per-tensor learning rate for the scores
        if self.grad_scale != 1.0:
            for s in self.scores.values():
                if s.grad is not None:
                    s.grad.mul_(self.grad_scale)

    def densities(self) -> Mapping[str, LayerDensity]:
        return self._densities

    def functional(self) -> Functional | None:
        """The sign-supermask step as a :class:`Functional`: the scores (``score/{name}``) and the
        trained tensors are trained; ``W0`` (``w0/{name}``) and the kept positions
        (``flat/{name}``) travel as buffers; the scores' gradients are scaled by ``grad_scale``.
        :class:`SignedWeightFn`'s numbers, written with plain operations: the value
        ``where(s >= 0, W0, -W0)`` plus ``W0 * (c - c.detach())`` (exactly 0) for the STE's
        gradient, ``c = s * 1[|s| <= clip]``."""
        base = Functional.of_model(self.model, self._trained, self._densities)
        clip = self.clip
        shapes = {k: self._full[k].shape for k in self.scores}
        model_names = list(base.buffers)
        model = self.model
        params = {**{f"score/{k}": s for k, s in self.scores.items()}, **base.params}
        buffers = dict(base.buffers)
        for k in self.scores:
            buffers[f"w0/{k}"] = self._w0[k][0]
            flat = self._flat[k]
            if flat is not None:
                buffers[f"flat/{k}"] = flat

        def forward(p: Mapping[str, Tensor], b: Mapping[str, Tensor], x: Tensor) -> Tensor:
            weights = {}
            for k, shape in shapes.items():
                s, w0 = p[f"score/{k}"], b[f"w0/{k}"]
                c = s if clip is None else s * (s.abs() <= clip).to(s.dtype)
                vals = torch.where(s >= 0, w0, -w0) + w0 * (c - c.detach())
                if f"flat/{k}" in b:
                    vals = vals.new_zeros(shape.numel()).index_copy(0, b[f"flat/{k}"], vals)
                weights[k] = vals.view(shape)
            tensors = {n: b[n] for n in model_names}
            tensors.update({n: p[n] for n in base.params})
            tensors.update(weights)
            return functional_call(model, tensors, (x,))

        scale = {f"score/{k}": self.grad_scale for k in self.scores} if self.grad_scale != 1.0 else {}
        return Functional(
            params=params,
            buffers=buffers,
            forward=forward,
            grad_scale=scale,
            densities=self._densities,
            key=("hidenseek", clip),
        )

    def trained_scores(self) -> dict[str, Tensor]:
        """The full score tensors: the trained kept positions, the initial pruned ones."""
        out = {}
        for k, s in self.scores.items():
            full = self._full[k].clone()
            flat = self._flat[k]
            if flat is None:
                full.copy_(s.detach().view(full.shape))
            else:
                full.view(-1).index_copy_(0, flat, s.detach())
            out[k] = full
        return out

    def close(self) -> None:
        for n, p in self.model.named_parameters():
            if n in self._before:
                p.requires_grad_(self._before[n])
        for k, s in self.trained_scores().items():
            self.state[f"score/{k}"] = s


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@METHODS.register(
    "hidenseek", HideNseekConfig, summary="HideNseek (Vallapuram et al. 2022, reconstruction): SynFlow + sign supermask"
)
class HideNseek(Method):
    """HideNseek (reconstruction): server-side SynFlow at init, frozen weights, a sign supermask
    learned collectively by majority vote; see docs/methods for the algorithm and every choice"""

    config_cls = HideNseekConfig
    config: HideNseekConfig

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        self.roles = tensor_roles(spec.template, config)

    # ---------------------------------------------------------------------------------- server
    def _init_weight(self, name: str, w: Tensor) -> Tensor:
        mode = self.config.weight_init
        if mode == "model":
            return w.clone()
        std = math.sqrt(2.0 / max(1, w[0].numel()))  # fan_in = in_channels/groups * kernel
        g = torch_gen(self.experiment.seed, "hidenseek", "init", name)
        if mode == "kaiming_normal":
            return (torch.randn(w.shape, generator=g, dtype=torch.float64) * std).to(w.dtype)
        signs = torch.randint(0, 2, w.shape, generator=g).to(torch.float64) * 2 - 1
        return (signs * std).to(w.dtype)

    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """Random ``W_init``, SynFlow to ``method.sparsity``, frozen ``W0 = M * W_init``; global
        signs all +1 (so the initial global model is ``W0``)."""
        cfg = self.config
        params = dict(params)
        for k in self.roles.scope:
            params[k] = self._init_weight(k, params[k])
        masks = {k: torch.ones(params[k].shape, dtype=torch.bool) for k in self.roles.scope}
        if cfg.sparsity > 0 and self.roles.prune_scope:
            model = self.spec.build()
            model.load_state_dict(params, strict=True)
            pruned = prune(
                model,
                "synflow",
                cfg.sparsity,
                scope=self.roles.prune_scope,
                seed=derive_seed(self.experiment.seed, "hidenseek", "synflow"),
                iterations=cfg.synflow_iterations,
                input_shape=tuple(self.spec.input_shape),
                min_keep_fraction=cfg.min_keep_fraction,
            )
            masks.update({k: pruned[k].clone() for k in pruned})
        for k in self.roles.scope:
            m = masks[k]
            w = params[k] * m.to(params[k].dtype)
            if cfg.rescale:
                dens = float(m.float().mean())
                w = w / math.sqrt(dens) if dens > 0 else w
            params[k] = w
        extra = {f"sign/{k}": torch.ones_like(params[k]) for k in self.roles.scope}
        if cfg.carry == "server":
            for k in self.roles.scope:
                g = torch_gen(self.experiment.seed, "hidenseek", "server_scores", k)
                mag = torch.randn(params[k].shape, generator=g).abs() if cfg.score_init == "abs_normal" else 1.0
                extra[f"score/{k}"] = (cfg.score_scale * mag * masks[k]).to(torch.float32)
        return ServerState(round=0, params=params, mask=Mask(masks), extra=extra)

    def signs(self, state: ServerState) -> dict[str, Tensor]:
        """The global sign mask: +-1 per scope weight (+1 on pruned positions, unused)."""
        return {k: state.extra[f"sign/{k}"] for k in self.roles.scope}

    def _mask(self, state: ServerState) -> Mask:
        if state.mask is None:
            raise ValueError("hidenseek: the server state has no mask (init_state was not run)")
        return state.mask

    def setup_payload(self, state: ServerState) -> Update | None:
        """The frozen tensors, once per client: ``W0`` with ``sent = M`` (the mask travels with it),
        and every tensor not sent each round."""
        mask = self._mask(state)
        names = self.roles.scope + self.roles.frozen
        return Update(values={k: state.params[k] for k in names}, sent={k: mask[k] for k in self.roles.scope})

    def broadcast(self, state: ServerState) -> Update:
        """The global signs on the kept positions (known mask: 1 bit each; ``carry=server``: the
        global float scores) and the per-round tensors."""
        mask = self._mask(state)
        if self.config.carry == "server":
            values = {k: state.extra[f"score/{k}"] * mask[k] for k in self.roles.scope}
        else:
            values = {k: g * mask[k].to(g.dtype) for k, g in self.signs(state).items()}
        values.update({k: state.params[k] for k in self.roles.per_round})
        return Update(values=values, sent={k: mask[k] for k in self.roles.scope})

    def known_masks(self, setup: Update) -> dict[str, Tensor]:
        """``M`` per scope weight (the setup's sent masks): sign tensors are sent without it."""
        return {
            k: setup.sent[k] if k in setup.sent else torch.ones(setup.values[k].shape, dtype=torch.bool)
            for k in self.roles.scope
        }

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """Sign majority vote (ties keep the previous sign), or with ``upload=score`` the sign of
        the mean score (0 keeps the previous sign); FedAvg on the per-round tensors; the frozen
        tensors are carried over untouched. Appends the round's flip statistics to
        ``extra["stats/..."]`` (see :func:`flip_stats`)."""
        cfg = self.config
        w = [r.num_examples if cfg.vote == "weighted" else 1 for r in received]
        mask = self._mask(state)
        extra = dict(state.extra)
        flips = survived = changed = kept = 0
        for k, prev in self.signs(state).items():
            votes = [
                r.update.values[k] * mask[k].to(r.update.values[k].dtype) for r in received if k in r.update.values
            ]
            ws = [wi for wi, r in zip(w, received) if k in r.update.values]
            if cfg.upload == "score" and votes:
                mean = sum(wi * v.to(torch.float64) for wi, v in zip(ws, votes)) / sum(ws)
                new = torch.where(mean > 0, 1.0, torch.where(mean < 0, -1.0, prev.to(torch.float64))).to(prev.dtype)
                if cfg.carry == "server":
                    extra[f"score/{k}"] = mean.to(torch.float32)
            else:
                new = sign_vote(prev, votes, ws)
            f, sv = flip_counts(prev, new, votes, mask[k])
            flips, survived = flips + f, survived + sv
            changed += int(((new != prev) & mask[k]).sum())
            kept += int(mask[k].sum())
            extra[f"sign/{k}"] = new
        n = max(1, len(received))
        row = {
            "flip_survival": survived / flips if flips else float("nan"),
            "client_flips": flips / n / max(1, kept),
            "sign_change": changed / max(1, kept),
        }
        for name, v in row.items():
            old = extra.get(f"stats/{name}", torch.zeros(0, dtype=torch.float64))
            extra[f"stats/{name}"] = torch.cat([old, torch.tensor([v], dtype=torch.float64)])
        params = dict(state.params)
        if self.roles.per_round and received:
            new = agg.weighted_mean(
                [r.update for r in received], [r.num_examples for r in received], self.roles.per_round
            )
            params.update(new)
        return ServerState(round=state.round + 1, params=params, mask=state.mask, extra=extra)

    def update_norm(self, state: ServerState, received: Received) -> float:
        """Fraction of the kept weights whose sign this client flipped against the global signs."""
        mask = self._mask(state)
        flipped = kept = 0
        for k, g in self.signs(state).items():
            u = received.update.values.get(k)
            m = mask[k]
            kept += int(m.sum())
            if u is not None:
                flipped += int(((torch.sign(u) != g) & m).sum())
        return flipped / kept if kept else 0.0

    def eval_params(self, state: ServerState) -> StateDict:
        """The global model ``M * W0 * g``."""
        return effective_params(state.params, self.signs(state))

    # ---------------------------------------------------------------------------------- client
    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Keep the setup's frozen tensors (``frozen/{name}``; the mask is the runtime's known
        mask); load ``W0`` and the frozen tensors from the client's state and the per-round
        tensors from the downlink; keep the round's global signs as ``global_sign/{name}``."""
        if setup is not None:
            names = self.roles.scope + self.roles.frozen
            client_state = {**client_state, **{f"frozen/{k}": setup.values[k] for k in names}}
        missing = [k for k in self.roles.scope + self.roles.frozen if f"frozen/{k}" not in client_state]
        if missing:
            raise ValueError(f"hidenseek: the client never received the frozen tensors (e.g. {missing[0]!r})")
        values = {k: client_state[f"frozen/{k}"] for k in self.roles.scope + self.roles.frozen}
        values.update({k: down.values[k] for k in self.roles.per_round})
        model.load_state_dict(values, strict=True)
        state = dict(client_state)
        for k in self.roles.scope:
            state[f"global_sign/{k}"] = down.values[k]
        return state

    def _initial_scores(self, client_state: ClientState, ctx: LocalContext) -> dict[str, Tensor]:
        cfg = self.config
        out: dict[str, Tensor] = {}
        for k in self.roles.scope:
            if cfg.personalize and f"score/{k}" in client_state:
                out[k] = client_state[f"score/{k}"].clone()
                continue
            g = client_state[f"global_sign/{k}"]
            if cfg.carry == "server":  # the downlink holds the global scores themselves
                out[k] = g.to(torch.float32).clone()
                continue
            if cfg.carry == "client" and f"score/{k}" in client_state:
                mag = client_state[f"score/{k}"].abs()
                if cfg.ste == "clipped":  # a score beyond the clip would never get a gradient again
                    mag = mag.clamp(max=cfg.ste_clip)
                out[k] = mag * torch.where(g < 0, -1.0, 1.0)
                continue
            if cfg.score_init == "constant":
                s0 = torch.full(g.shape, cfg.score_scale, dtype=torch.float32)
            else:
                gen = torch_gen(ctx.seed, "hidenseek", "scores", ctx.client_id, ctx.round, k)
                s0 = torch.randn(g.shape, generator=gen).abs() * cfg.score_scale
            # drawn on the CPU (the same scores on every device), used where the model is
            out[k] = s0.to(g.device) * torch.where(g < 0, -1.0, 1.0)  # pruned positions (g = 0): +s0, unused
        return out

    @property
    def why_not_batched(self) -> str | None:
        """Batched: :class:`SignSupermaskHooks` describes its step (:meth:`LocalHooks.functional`)."""
        return None

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> SignSupermaskHooks:
        """Sign-supermask training for this round (scores from the global signs, or the client's
        own with ``personalize``)."""
        dens: dict[str, LayerDensity] = {}
        for k in self.roles.scope:
            if k in self.profile:
                d = float(client_state[f"{KNOWN}{k}"].float().mean())
                dens[k] = LayerDensity(forward=d, grad_input=d, grad_weight=d)
        return SignSupermaskHooks(
            model,
            self.profile,
            self.roles,
            self.config,
            self._initial_scores(client_state, ctx),
            self.config.score_lr / self.experiment.local.lr,
            dens,
            client_state,
            {k: client_state[f"{KNOWN}{k}"] for k in self.roles.scope if f"{KNOWN}{k}" in client_state},
        )

    def personal_params(self, model: nn.Module, client_state: ClientState) -> StateDict:
        """The client's own effective weights ``M * W0 * sign(s)`` with its last scores."""
        sd = model.state_dict()
        signs = {k: hard_sign(client_state[f"score/{k}"]) for k in self.roles.scope if f"score/{k}" in client_state}
        return effective_params(sd, signs)

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """``sign(s)`` on the kept positions (sent = the known mask) and the per-round tensors."""
        values: StateDict = {}
        sent: dict[str, Tensor] = {}
        for k in self.roles.scope:
            m = client_state[f"{KNOWN}{k}"]
            s = client_state[f"score/{k}"]
            values[k] = (s if self.config.upload == "score" else hard_sign(s)) * m.to(torch.float32)
            sent[k] = m
        sd = model.state_dict()
        values.update({k: sd[k].detach().clone() for k in self.roles.per_round})
        state = {k: v for k, v in client_state.items() if not k.startswith("global_sign/")}
        return Update(values=values, sent=sent), state


__all__ = [
    "HideNseek",
    "HideNseekConfig",
    "Roles",
    "SignSTE",
    "SignedWeightFn",
    "SignSupermaskHooks",
    "effective_params",
    "flip_counts",
    "flip_stats",
    "hard_sign",
    "sign_ste",
    "sign_vote",
    "tensor_roles",
]
