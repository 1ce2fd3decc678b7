"""BatchNorm-only federated training (Frankle, Schwab and Morcos, ICLR 2021).

"Training BatchNorm and Only BatchNorm" freezes every convolution and linear layer at its random
initialisation and trains only the BatchNorm affine parameters (``method.train_classifier``
also trains the output layer). Federated, a client update is two floats per channel each way,
after the frozen random features have been sent once in the setup payload. Reference code:
facebookresearch/open_lth. Options and choices: ``docs/methods/bn_only.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sparsefl.accounting import LayerDensity, ModelProfile
from sparsefl.comm import Update
from sparsefl.config import MethodConfig, opt
from sparsefl.errors import ConfigError
from sparsefl.methods.base import LocalHooks, Method
from sparsefl.protocol import aggregate as agg
from sparsefl.protocol.messages import ClientState, LocalContext, Received, ServerState, StateDict
from sparsefl.registry import METHODS
from sparsefl.rng import torch_gen

_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class BNOnlyConfig(MethodConfig):
    """Options of BatchNorm-only training (docs/methods)."""

    train_classifier: bool = opt(False, "also train (and send) the classifier, the last linear layer")
    bn_init: Literal["uniform", "fixed", "keep"] = opt(
        "uniform", "BatchNorm gamma/beta init: uniform gamma~U(0,1), beta=0 (open_lth); fixed 1, 0; keep the model's"
    )

    def __post_init__(self) -> None:
        if self.sparsity != 0:
            raise ConfigError("method.sparsity", self.sparsity, "0 for bn_only (it prunes no weights)")


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
        self.sent = self.trained + self.bn_buffers
        self.bn_affine = [
            f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, _BN) and m.affine for p in ("weight", "bias")
        ]

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[torch.Tensor, torch.Tensor] | None = None) -> ServerState:
        """Apply ``method.bn_init`` to the BatchNorm affine parameters."""
        params = dict(params)
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

    def broadcast(self, state: ServerState) -> Update:
        """The trained tensors and BatchNorm statistics."""
        return Update(values={k: state.params[k] for k in self.sent})

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """Sample-weighted mean of the sent tensors; every other tensor is carried over as is."""
        new = agg.weighted_mean([r.update for r in received], [r.num_examples for r in received], self.sent)
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
        values.update(down.values)
        model.load_state_dict(values, strict=True)
        return client_state

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks:
        return FrozenHooks(model, self.profile, self.trained)

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """Only the trained tensors and the BatchNorm statistics."""
        sd = model.state_dict()
        return Update(values={k: sd[k].detach().clone() for k in self.sent}), client_state


__all__ = ["BNOnly", "BNOnlyConfig", "FrozenHooks", "split_tensors"]
