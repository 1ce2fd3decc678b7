"""The method interface: the hooks around the one server loop and the one local training loop.

A federated method is a :class:`Method` subclass registered in ``sparsefl.registry.METHODS``
with its own config dataclass (a subclass of :class:`sparsefl.config.MethodConfig`). The base
class *is* dense FedAvg: every hook has the FedAvg behaviour as its default, so a method
overrides only what it changes; :class:`Wrapper` forwards every hook to an inner method, so a
method around another (distillation) overrides only what it adds.

Server side (pure functions of values, no client objects): ``init_state`` -> per round
``task_config`` and the downlink (``broadcast``, or ``downlink`` per client) -> ``aggregate``
the decoded uploads -> ``eval_params`` for evaluation.

Client side (inside :func:`sparsefl.runtime.run_client`, the same code on every engine):
``new_model`` -> ``receive`` the decoded downlink (and the one-time setup) -> ``prepare`` with
the client's own data -> ``hooks`` around the training loop -> ``upload`` what to send.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparsefl.accounting import LayerDensity, ModelProfile, inference_flops
from sparsefl.comm import Update
from sparsefl.config import ExperimentConfig, MethodConfig
from sparsefl.errors import ConfigError
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

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Functional:
    """One client's local step as a pure function of tensors, for the batched executor
    (:mod:`sparsefl.runtime.batched`), which stacks every client's tensors along a leading client
    dimension and runs the step of all clients as one vectorised computation (``torch.func``).

    Attributes
    ----------
    params:
        Name -> the live tensor the optimiser updates: exactly :meth:`LocalHooks.parameters`, in
        that order. The executor writes the trained values back into them before ``close``.
    buffers:
        Name -> a tensor the forward reads but does not train (frozen weights, masks, BatchNorm
        statistics, which the forward updates in place); written back like ``params``.
    forward:
        ``(params, buffers, x) -> logits``, pure. The executor runs one client's function for
        every client with the same :attr:`key`, so everything per client travels in ``params``
        and ``buffers``; the function may close over the method's settings and over the model's
        structure only (:func:`torch.func.functional_call` replaces every tensor it names).
    grad_scale:
        Name -> a factor (a tensor of the parameter's shape, e.g. a 0/1 mask, or a float)
        multiplied into that parameter's gradient before the optimiser step, as
        :meth:`LocalHooks.after_backward` does in the sequential loop.
    densities:
        :meth:`LocalHooks.densities` of every step (constant through the round), for the FLOPs.
    loss:
        ``(logits, y, x) -> loss`` (default: cross-entropy).
    key:
        Clients run together only when their keys (and tensor names, shapes and dtypes) are
        equal: whatever ``forward`` closes over that could differ between clients.
    state:
        Per-client tensors a step carries to the next (e.g. cached thresholds). With any, the
        forward is ``(params, buffers, x, state, step) -> (logits, new_state, stats)``: ``step``
        the local step (an int), ``stats`` name -> integer 0-d tensors (e.g. kept counts) from
        which :attr:`step_densities` gives that step's densities (instead of :attr:`densities`).
    step_densities:
        ``stats -> densities`` of one step (the stats as Python ints), with :attr:`state`.
    """

    params: Tensors
    buffers: Tensors
    forward: Callable[..., Any]  # (params, buffers, x) -> logits; see ``state`` for the other form
    grad_scale: Mapping[str, torch.Tensor | float] = field(default_factory=dict)
    densities: Mapping[str, LayerDensity] = field(default_factory=dict)
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = lambda logits, y, x: F.cross_entropy(
        logits, y
    )
    key: Hashable = ()
    state: Tensors = field(default_factory=dict)
    step_densities: Callable[[Mapping[str, int]], Mapping[str, LayerDensity]] | None = None

    @staticmethod
    def of_model(
        model: nn.Module, trained: Sequence[torch.Tensor], densities: Mapping[str, LayerDensity] | None = None
    ) -> Functional:
        """The plain step of ``model``: ``trained`` (some of its parameters) by state_dict name,
        every other parameter and buffer as buffers, forward = the model's own."""
        ids = {id(t) for t in trained}
        named = dict(model.named_parameters())
        by_id = {id(t): n for n, t in named.items()}
        if any(i not in by_id for i in ids):
            raise ValueError("Functional.of_model: a trained tensor is not a parameter of the model")
        params = {by_id[id(t)]: t for t in trained}
        buffers = {n: t for n, t in named.items() if n not in params}
        buffers.update({n: b for n, b in model.named_buffers() if b is not None})

        def forward(p: Tensors, b: Tensors, x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, {**p, **b}, (x,))

        return Functional(params=params, buffers=buffers, forward=forward, densities=dict(densities or {}))


#: LocalHooks methods whose override changes the step, so :meth:`LocalHooks.functional`'s
#: default (the plain step) no longer describes it.
_STEP_HOOKS = ("parameters", "forward", "loss", "after_backward", "after_step", "update_rows", "row_grads")


class LocalHooks:
    """Hooks a method places around the one local training loop; defaults are plain SGD.

    A method returns an instance from :meth:`Method.hooks`; :meth:`close` removes anything it
    installed on the model (temporary hooks only; the loop calls it in a ``finally``).
    """

    def __init__(self, model: nn.Module, profile: ModelProfile) -> None:
        self.model = model
        self.profile = profile

    def parameters(self) -> list[nn.Parameter]:
        """The tensors the optimiser updates (default: every parameter requiring grad)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch."""
        return self.model(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch (default: cross-entropy)."""
        return F.cross_entropy(logits, y)

    def after_backward(self, step: int) -> None:
        """Called after ``loss.backward()``, before the optimiser step."""

    def after_step(self, step: int) -> None:
        """Called after the optimiser step."""

    def update_rows(self) -> Mapping[torch.Tensor, torch.Tensor]:
        """Parameters whose update this step is restricted to some rows (dim 0): parameter ->
        int64 row indices; the optimiser leaves every other row, and its momentum, untouched.
        Default: none (every parameter is updated whole)."""
        return {}

    def row_grads(self) -> Mapping[torch.Tensor, torch.Tensor]:
        """Gradients computed row-compact this step: parameter -> the gradient of its
        :meth:`update_rows` rows, in their order (kernels that skip the full zero gradient).
        Default: none."""
        return {}

    def densities(self) -> Mapping[str, LayerDensity]:
        """Per-layer fractions of the dense FLOPs that really ran in the last step."""
        return {}

    def close(self) -> None:
        """Remove whatever the hooks installed."""

    def functional(self) -> Functional | None:
        """This step as a :class:`Functional`, for the batched executor, or None when it cannot
        be described so. Default: the plain step (:meth:`Functional.of_model` with
        :meth:`parameters` and :meth:`densities`) when a subclass overrides none of the step's
        hooks, else None; a subclass that changes the step overrides this to opt in."""
        if any(getattr(type(self), n) is not getattr(LocalHooks, n) for n in _STEP_HOOKS):
            return None
        return Functional.of_model(self.model, self.parameters(), self.densities())


class Method:
    """Dense FedAvg (McMahan et al. 2017); the base every method extends.

    The server broadcasts the full global model; each client trains it with SGD and returns its
    full weights; the server takes the sample-weighted mean of every tensor (float buffers such
    as BatchNorm statistics included).
    """

    config_cls: type[MethodConfig] = MethodConfig

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile
    ) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.experiment = experiment
        self.spec = spec
        self.profile = profile

    # ---------------------------------------------------------------------------------- server
    def init_state(self, params: StateDict, proxy: tuple[torch.Tensor, torch.Tensor] | None = None) -> ServerState:
        """The server state before round 1 from freshly initialised ``params``.

        ``proxy`` is a small held-out batch the server may use (e.g. data-dependent pruning)."""
        return ServerState(round=0, params=params)

    def setup_payload(self, state: ServerState) -> Update | None:
        """A one-time payload for a client's first participation (e.g. a shared mask), or None."""
        return None

    def known_masks(self, setup: Update) -> dict[str, torch.Tensor]:
        """Masks both sides hold once a client has the setup payload ``setup`` (as built on the
        server, as decoded on the client); later messages omit them (4-byte fingerprints)."""
        return {}

    def task_config(self, state: ServerState, clients: Sequence[int]) -> Mapping[int, TaskConfig]:
        """Settings for the round's sampled ``clients`` (in sampling order), by client id; each
        travels with that client's task (``ctx.config``). Default: none."""
        return {}

    def broadcast(self, state: ServerState) -> Update:
        """What every client downloads this round unless :meth:`downlink` personalises it.
        The server encodes it once per round and counts it once per client that receives it."""
        return Update(values=state.params)

    def downlink(self, state: ServerState, client_id: int) -> Update | None:
        """A personalised downlink for ``client_id`` (e.g. only its skeleton), or None for the
        :meth:`broadcast`."""
        return None

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """The new server state from the round's decoded uploads."""
        names = list(state.params)
        new = agg.weighted_mean([r.update for r in received], [r.num_examples for r in received], names)
        return ServerState(round=state.round + 1, params=new, mask=state.mask, extra=state.extra)

    def update_norm(self, state: ServerState, received: Received) -> float:
        """Size of one client's update, for robust aggregation: the L2 norm of its change to the
        global float tensors over the coordinates it sent (methods whose uploads are not
        weights override this)."""
        total = 0.0
        for name, v in received.update.values.items():
            cur = state.params.get(name)
            if cur is None or not cur.is_floating_point():
                continue
            d = v.to(torch.float64) - cur.to(torch.float64)
            sent = received.update.sent.get(name)
            if sent is not None:
                d = d * sent
            total += float((d * d).sum())
        return total**0.5

    def eval_params(self, state: ServerState) -> StateDict:
        """The state_dict the global test evaluation uses."""
        return state.params

    def inference_flops_per_sample(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> tuple[float, float]:
        """``(effective, dense)`` forward FLOPs per sample of the global model ``params``.

        Effective counts each Conv/Linear layer's forward at the fraction of its weights that are
        nonzero (what a sparse kernel would compute; theoretical); methods with input-dependent
        computation (gating) override this and measure on ``x``.
        """
        dens = {
            layer.name: LayerDensity(forward=float((params[layer.name] != 0).float().mean()))
            for layer in self.profile.layers
            if layer.name in params and params[layer.name].numel()
        }
        return float(inference_flops(self.profile, 1, dens).forward), float(self.profile.dense_forward())

    # ---------------------------------------------------------------------------------- client
    def new_model(self) -> nn.Module:
        """A fresh model for local training (methods that add modules wrap it here)."""
        return self.spec.build()

    def setup_spec(self, spec: Spec) -> Spec:
        """Names, shapes and dtypes the setup payload may carry (default: the model's own
        tensors); a method that ships more (e.g. a distillation teacher) adds them here."""
        return spec

    def receive(
        self, model: nn.Module, down: Update, client_state: ClientState, setup: Update | None = None
    ) -> ClientState:
        """Load the downlink into ``model``; return the client's state. ``setup`` is the decoded
        setup payload on the client's first participation (keep what later rounds need)."""
        model.load_state_dict(down.values, strict=True)
        return client_state

    def prepare(self, model: nn.Module, data: ClientData, client_state: ClientState, ctx: LocalContext) -> ClientState:
        """Work on the client's own data before training (scoring, mask search); returns the
        client's state. Default: nothing."""
        return client_state

    def hooks(self, model: nn.Module, client_state: ClientState, ctx: LocalContext) -> LocalHooks | None:
        """The hooks around local training, or None to train nothing this round."""
        return LocalHooks(model, self.profile)

    def personal_params(self, model: nn.Module, client_state: ClientState) -> StateDict:
        """The state_dict of the client's own model after local training, for its validation
        accuracy (methods whose forward is reparameterised return the effective weights)."""
        return model.state_dict()

    def upload(
        self, model: nn.Module, down: Update, client_state: ClientState, ctx: LocalContext
    ) -> tuple[Update, ClientState]:
        """What the client sends, and its state for next time."""
        return Update(values={k: v.detach().clone() for k, v in model.state_dict().items()}), client_state

    @property
    def loss_is_cross_entropy(self) -> bool:
        """Whether the training loss clients report is the task's cross-entropy (as the default
        local loss), so a loss at chance level, ``ln C``, means nothing was learnt: the premise
        of the divergence warning, which methods adding other terms (KD) do not meet."""
        return True

    @property
    def why_not_batched(self) -> str | None:
        """Why this method's clients cannot train in the batched executor, or None when they can
        (their :meth:`LocalHooks.functional` describes the step). Default: None for the plain
        :meth:`hooks` (a :class:`Wrapper` that keeps its inner method's hooks: the inner's
        answer); a method with its own hooks overrides this property to opt in."""
        hooks = type(self).hooks
        if hooks is Method.hooks:
            return None
        if isinstance(self, Wrapper) and hooks is Wrapper.hooks:
            return self.inner.why_not_batched
        return f"{self.config.name}: its local hooks do not describe their step functionally (LocalHooks.functional)"


def mask_setup(state: ServerState) -> Update | None:
    """The global mask as a setup payload (values 1.0 on the kept set, the kept set as
    ``sent``), or None before one exists. With :func:`setup_masks` as :meth:`Method.known_masks`
    both sides know the mask afterwards; the server sends the setup again to a client whose copy
    is older, so a mask that changes costs its encoding once per client that receives it."""
    if state.mask is None:
        return None
    mask = dict(state.mask.items())
    return Update(values={n: m.to(state.params[n].dtype) for n, m in mask.items()}, sent=mask)


def setup_masks(setup: Update) -> dict[str, torch.Tensor]:
    """The masks of a :func:`mask_setup` payload (a :meth:`Method.known_masks`)."""
    return dict(setup.sent)


def schedule_end(rounds: int, every: tuple[str, int], until: tuple[str, float], first: int = 1) -> int:
    """The end round, ``floor(until * rounds)``, of a mask schedule that changes the mask on the
    multiples of ``every`` from round ``first`` with a share that decays to 0 at the end round;
    each pair is (key, value).

    Raises ConfigError naming the ``every`` key when no such multiple comes before the end round:
    that schedule never changes the mask, a static mask under another method's name."""
    (every_key, n), (until_key, fraction) = every, until
    end = math.floor(fraction * rounds + 1e-9)
    if -(-first // n) * n < end:
        return end
    where = f"the end round {end} = floor({until_key} {fraction} x federation.rounds {rounds})"
    if end > first:
        allowed = f"a period with a multiple in rounds {first} to {end - 1}, before {where} (or raise either)"
    else:
        allowed = f"none: {where} leaves no round from {first} on (raise either)"
    raise ConfigError(every_key, n, allowed + "; as set, the mask never changes")


#: Every hook a method may override (what :class:`Wrapper` forwards).
HOOKS = (
    "init_state", "setup_payload", "known_masks", "task_config", "broadcast", "downlink", "aggregate",
    "update_norm", "eval_params", "inference_flops_per_sample", "new_model", "setup_spec", "receive",
    "prepare", "hooks", "personal_params", "upload",
)  # fmt: skip


class Wrapper(Method):
    """A method around an ``inner`` one: every hook forwards to it, so a subclass overrides only
    what it changes (as optax's ``chain`` composes transformations)."""

    def __init__(
        self, config: MethodConfig, experiment: ExperimentConfig, spec: ModelSpec, profile: ModelProfile, inner: Method
    ) -> None:
        super().__init__(config, experiment, spec, profile)
        self.inner = inner

    @property
    def loss_is_cross_entropy(self) -> bool:
        """The inner method's."""
        return self.inner.loss_is_cross_entropy


def _forward(name: str):  # type: ignore[no-untyped-def]
    def hook(self: Wrapper, *args, **kwargs):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"The inner method's ``{name}``."
    return hook


for _name in HOOKS:
    setattr(Wrapper, _name, _forward(_name))
