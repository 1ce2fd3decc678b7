"""BatchNorm-only federated training (Frankle, Schwab and Morcos, ICLR 2021).

"Training BatchNorm and Only BatchNorm" freezes every convolution and linear layer at its random
initialisation and trains only the BatchNorm affine parameters (``method.train_classifier``
also trains the output layer). Federated, a client update is two floats per channel each way,
after the frozen random features have been sent once in the setup payload.

The frozen weights are drawn Kaiming-normal (fan-in), as open_lth initialises them: PyTorch's
default uniform init is about 2.45x smaller, and on frozen features that leaves the logits near
zero. ``method.trained=random`` is the paper's control: the same number of trainable parameters,
two randomly chosen weights per convolution output channel, with BatchNorm frozen. Reference
code: facebookresearch/open_lth. Options and choices: ``docs/methods/bn_only.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update
from sparsefl.config import MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.methods.base import Functional, LocalHooks, Method
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.messages import ClientState, LocalContext, Received, ServerState, StateDict
from sparsefl.registry import METHODS
from sparsefl.rng import torch_gen

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class BNOnlyConfig(MethodConfig):
    """Options of BatchNorm-only training (docs/methods)."""

    train_classifier: bool = opt(False, "also train (and send) the classifier, the last linear layer")
    bn_init: Literal["uniform", "fixed", "keep"] = opt(
        "uniform", "BatchNorm gamma/beta init: uniform gamma~U(0,1), beta=0 (open_lth); fixed 1, 0; keep the model's"
    )
    weight_init: Literal["kaiming_normal", "model"] = opt(
        "kaiming_normal", "frozen Conv/Linear weights: N(0, 2/fan_in) (open_lth), or the model's own init"
    )
    bn_lr: float = opt(
        0.5, "learning rate of the trained tensors at round 1 (follows local.lr's schedule)", gt=0, le=1e6
    )
    trained: Literal["bn", "random"] = opt(
        "bn", "bn: BatchNorm affine; random: the paper's control, 2 random weights per conv channel, BN frozen"
    )

    def __post_init__(self) -> None:
        if self.sparsity != 0:
            raise ConfigError("method.sparsity", self.sparsity, "0 for bn_only (it prunes no weights)")


def random_entries(model: nn.Module, seed: int, per_channel: int = 2) -> dict[str, torch.Tensor]:
    """Flat indices of ``per_channel`` distinct random entries of each output channel of every
    convolution weight (all of them when a channel has fewer), drawn from ``(seed, "bn_only",
    "random", name)``: the same on the server and every client."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, _CONV):
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        rows, per_row = mod.weight.shape[0], mod.weight[0].numel()
        k = min(per_channel, per_row)
        g = torch_gen(seed, "bn_only", "random", name)
        cols = torch.rand(rows, per_row, generator=g).argsort(dim=1)[:, :k]
        out[name] = (torch.arange(rows).unsqueeze(1) * per_row + cols).reshape(-1).sort().values
    return out


def split_tensors(model: nn.Module, train_classifier: bool) -> tuple[list[str], list[str], list[str]]:
    """``(trained, bn_buffers, frozen)`` state_dict names of ``model``.

    ``trained``: BatchNorm affine parameters (+ the last linear layer's parameters when
    ``train_classifier``); ``bn_buffers``: BatchNorm running statistics and counters;
    ``frozen``: every other parameter and buffer.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    classifier = linears[-1] if (train_classifier and linears) else None
    trained: list[str] = []
    buffers: list[str] = []
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, _BN) or (classifier is not None and mod_name == classifier):
            trained += [prefix + n for n, _ in mod.named_parameters(recurse=False)]
        if isinstance(mod, _BN):
            buffers += [prefix + n for n, b in mod.named_buffers(recurse=False) if b is not None]
    keep = set(trained) | set(buffers)
    frozen = [k for k in model.state_dict() if k not in keep]
    return trained, buffers, frozen


class FrozenHooks(LocalHooks):
    """Switch ``requires_grad`` off for every parameter not in ``trained`` (restored in
    :meth:`close`) and report ``grad_weight = 0`` for frozen counted layers."""

    def __init__(self, model: nn.Module, profile: ModelProfile, trained: Sequence[str]) -> None:
        super().__init__(model, profile)
        keep = set(trained)
        self._before = {n: p.requires_grad for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        self._densities = {
            name: LayerDensity(forward=1.0, grad_input=1.0, grad_weight=0.0)
            for name in profile.names()
            if name not in keep
        }

    def densities(self) -> Mapping[str, LayerDensity]:
        return self._densities

    def close(self) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._before[n])


class ScaledHooks(FrozenHooks):
    """:class:`FrozenHooks` with the trained tensors' gradients scaled by ``grad_scale``
    (``bn_lr / local.lr``: for SGD with momentum, a learning rate of ``bn_lr`` on the gradient;
    weight decay and ``local.clip_norm`` still act at ``local.lr``'s scale)."""

    def __init__(self, model: nn.Module, profile: ModelProfile, trained: Sequence[str], grad_scale: float) -> None:
        super().__init__(model, profile, trained)
        self.grad_scale = grad_scale

    def after_backward(self, step: int) -> None:
        if self.grad_scale != 1.0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.grad_scale)

    def functional(self) -> Functional | None:
        """The plain step on the trained tensors, their gradients times ``grad_scale``."""
        f = Functional.of_model(self.model, self.parameters(), self._densities)
        return replace(f, grad_scale={k: self.grad_scale for k in f.params} if self.grad_scale != 1.0 else {})


class RandomEntryHooks(FrozenHooks):
    """Train only the given entries of some weights (every parameter frozen otherwise).

    Each selected entry set is its own 1-D parameter; the forward runs the model functionally with
    the weight ``W`` where the entries are replaced by it, so the other entries of ``W`` stay
    bit-identical and no weight decay or momentum touches them. :meth:`close` writes the trained
    entries back into the model. The gradients are scaled by ``grad_scale`` (as :class:`ScaledHooks`).
    """

    def __init__(
        self, model: nn.Module, profile: ModelProfile, entries: Mapping[str, torch.Tensor], grad_scale: float
    ) -> None:
        super().__init__(model, profile, [])
        self.grad_scale = grad_scale
        named = dict(model.named_parameters())
        self.entries = {k: i.to(named[k].device) for k, i in entries.items()}  # where the model computes
        self._base = {k: named[k].detach() for k in self.entries}
        self.values = {k: nn.Parameter(self._base[k].reshape(-1)[i].clone()) for k, i in self.entries.items()}
        self._densities.update(
            {k: LayerDensity(forward=1.0, grad_input=1.0, grad_weight=1.0) for k in self.entries if k in profile}
        )

    def parameters(self) -> list[nn.Parameter]:
        return list(self.values.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {
            k: w.reshape(-1).index_put((self.entries[k],), self.values[k]).view(w.shape) for k, w in self._base.items()
        }
        return functional_call(self.model, weights, (x,))

    def after_backward(self, step: int) -> None:
        if self.grad_scale != 1.0:
            for p in self.values.values():
                if p.grad is not None:
                    p.grad.mul_(self.grad_scale)

    def functional(self) -> Functional | None:
        """The selected entries as the trained tensors (``entries/{name}``), the model's tensors
        as buffers; the entries are the method's, the same for every client."""
        f = Functional.of_model(self.model, [], self._densities)
        model, entries = self.model, self.entries

        def forward(p: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            weights = {
                k: b[k].reshape(-1).index_put((i.to(b[k].device),), p[f"entries/{k}"]).view(b[k].shape)
                for k, i in entries.items()
            }
            return functional_call(model, {**b, **weights}, (x,))

        scale = {f"entries/{k}": self.grad_scale for k in entries} if self.grad_scale != 1.0 else {}
        params = {f"entries/{k}": v for k, v in self.values.items()}
        return replace(f, params=params, forward=forward, grad_scale=scale)

    def close(self) -> None:
        super().close()
        with torch.no_grad():
            for k, w in self._base.items():
                w.view(-1).index_copy_(0, self.entries[k], self.values[k].detach())


@METHODS.register("bn_only", BNOnlyConfig, summary="BatchNorm-only training (Frankle et al. 2021), frozen features")
class BNOnly(Method):
    """Train only BatchNorm (and optionally the classifier) on frozen random features.

    See docs/methods/bn_only.md for what is trained, sent and counted.
    """

    config_cls = BNOnlyConfig
    config: BNOnlyConfig

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        model = self.spec.build()
        self.trained, self.bn_buffers, self.frozen = split_tensors(model, self.config.train_classifier)
        self.entries: dict[str, torch.Tensor] = {}
        if self.config.trained == "random":
            # the control: BatchNorm affine frozen too, selected conv entries trained instead
            bn = [n for n in self.trained if n in self._bn_params(model)]
            self.trained = [n for n in self.trained if n not in bn]
            self.frozen = [k for k in model.state_dict() if k not in set(self.trained) | set(self.bn_buffers)]
            self.entries = random_entries(model, self.experiment.seed)
        self.sent = self.trained + self.bn_buffers + list(self.entries)
        self.bn_affine = [
            f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, _BN) and m.affine for p in ("weight", "bias")
        ]
        self.weights = [
            f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, (*_CONV, nn.Linear))
        ]
        self.entry_masks = {}
        for k, idx in self.entries.items():
            shape = model.state_dict()[k].shape
            m = torch.zeros(shape.numel(), dtype=torch.bool)
            m[idx] = True
            self.entry_masks[k] = m.view(shape)

    @staticmethod
    def _bn_params(model: nn.Module) -> set[str]:
        return {
            f"{n}.{p}" if n else p
            for n, m in model.named_modules()
            if isinstance(m, _BN)
            for p, _ in m.named_parameters(recurse=False)
        }

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[torch.Tensor, torch.Tensor] | None = None) -> ServerState:
        """Draw the frozen Conv/Linear weights (``method.weight_init``) and apply
        ``method.bn_init`` to the BatchNorm affine parameters, seeded from the run seed."""
        params = dict(params)
        if self.config.weight_init == "kaiming_normal":
            for name in self.weights:
                w = params[name]
                std = math.sqrt(2.0 / max(1, w[0].numel()))  # fan_in = in_channels/groups * kernel size
                g = torch_gen(self.experiment.seed, "bn_only", "init", name)
                params[name] = (torch.randn(w.shape, generator=g, dtype=torch.float64) * std).to(w.dtype)
        mode = self.config.bn_init
        if mode != "keep":
            for name in self.bn_affine:
                t = params[name]
                if name.endswith(".bias"):
                    params[name] = torch.zeros_like(t)
                elif mode == "fixed":
                    params[name] = torch.ones_like(t)
                else:
                    g = torch_gen(self.experiment.seed, "bn_only", "bn_init", name)
                    params[name] = torch.rand(t.shape, generator=g, dtype=t.dtype)
        return ServerState(round=0, params=params)

    def setup_payload(self, state: ServerState) -> Update | None:
        """The frozen tensors, sent once per client."""
        return Update(values={k: state.params[k] for k in self.frozen})

    def known_masks(self, setup: Update) -> dict[str, torch.Tensor]:
        """``trained=random``: the selected entries, a pure function of the seed, so they travel
        without their masks."""
        return dict(self.entry_masks)

    def broadcast(self, state: ServerState) -> Update:
        """The trained tensors and BatchNorm statistics (``trained=random``: the selected entries)."""
        return Update(values={k: state.params[k] for k in self.sent}, sent=dict(self.entry_masks))

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """Sample-weighted mean of the sent tensors (of the selected entries only, for
        ``trained=random``); every other tensor is carried over as is."""
        ups, ns = [r.update for r in received], [r.num_examples for r in received]
        dense = [k for k in self.sent if k not in self.entries]
        new = agg.weighted_mean(ups, ns, dense)
        if self.entries:
            new.update(agg.per_coordinate(ups, ns, state.params, list(self.entries)))
        params = {k: new.get(k, v) for k, v in state.params.items()}
        return ServerState(round=state.round + 1, params=params, mask=state.mask, extra=state.extra)

    # ---------------------------------------------------------------------------------- client
    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Keep the frozen tensors of the setup payload in the client's state; load them and the
        round's tensors from the downlink."""
        if setup is not None:
            client_state = {**client_state, **{f"frozen/{k}": setup.values[k] for k in self.frozen}}
        missing = [k for k in self.frozen if f"frozen/{k}" not in client_state]
        if missing:
            raise ValueError(f"bn_only: the client never received the frozen tensors (e.g. {missing[0]!r})")
        values = {k: client_state[f"frozen/{k}"] for k in self.frozen}
        for k, v in down.values.items():
            m = self.entry_masks.get(k)
            values[k] = v if m is None else torch.where(m, v, values[k])
        model.load_state_dict(values, strict=True)
        return client_state

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks:
        """Freeze everything but the trained tensors, which learn at ``method.bn_lr``."""
        scale = self.config.bn_lr / self.experiment.local.lr
        if self.entries:
            return RandomEntryHooks(model, self.profile, self.entries, scale)
        return ScaledHooks(model, self.profile, self.trained, scale)

    @property
    def why_not_batched(self) -> str | None:
        """Batched: its hooks describe their step (:meth:`LocalHooks.functional`)."""
        return None

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Only the trained tensors (or selected entries) and the BatchNorm statistics."""
        sd = model.state_dict()
        return Update(values={k: sd[k].detach().clone() for k in self.sent}, sent=dict(self.entry_masks)), client_state


__all__ = [
    "BNOnly",
    "BNOnlyConfig",
    "FrozenHooks",
    "RandomEntryHooks",
    "ScaledHooks",
    "random_entries",
    "split_tensors",
]
