"""What every pruning criterion shares: typed options, the working context, and purity.

A criterion is a class registered in :data:`sparsefl.registry.CRITERIA`. It receives a
:class:`PruneContext` (the user's model, read but never written; the prunable names; the data;
the loss; the seed) and returns either per-weight *scores* (higher = more important), which an
allocation (:mod:`sparsefl.pruning.allocation`) turns into a mask, or, for criteria that own
their loop (SynFlow, rate-distortion, Skeletonization), the mask itself.

Purity: a criterion never touches the user's model, which comes back exactly as it went in.
It works on :meth:`PruneContext.working_copy`, a ``copy.deepcopy`` whose gradients are cleared
and whose mode and ``requires_grad`` flags are set for the job; temporary forward hooks live on
that copy only, and gradients are taken with :func:`torch.autograd.grad`, which fills no
``.grad`` field. Randomness inside a criterion (dropout during a scoring pass, random scores,
random calibration inputs) comes from generators derived from the seed, never from seeded
globals; the global torch RNG is forked for the duration of a call and restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sparsefl.config import build, opt
from sparsefl.errors import ConfigError
from sparsefl.masks import Mask, default_scope
from sparsefl.registry import CRITERIA
from sparsefl.rng import derive_seed

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

#: Allocation rules understood by :func:`sparsefl.pruning.allocation.allocate`.
AllocationName = Literal["global", "layerwise", "erk", "lamp"]


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def object_opt(default: Any, help: str = "") -> Any:
    """A dataclass field holding a Python object (a mask) rather than a config scalar.

    Such options are passed through :func:`parse_options` after their own check instead of the
    scalar validation of :func:`sparsefl.config.build`.
    """
    return dataclasses.field(default=default, metadata={"help": help, "object": True})


@dataclass(frozen=True)
class ScopeOptions:
    """Options every criterion has: which layers stay dense when the default scope is used."""

    keep_first: bool = opt(False, "keep the first Conv/Linear layer dense (default scope only)")
    keep_last: bool = opt(False, "keep the last Conv/Linear layer (classifier) dense (default scope only)")


@dataclass(frozen=True)
class AllocationOptions(ScopeOptions):
    """Options of criteria whose scores are turned into a mask by an allocation rule.

    ``min_keep`` and ``min_keep_fraction`` form the minimum-threshold (MT) rule of Gupta et al.
    (global and lamp allocations): every layer keeps at least
    ``max(min_keep, floor(min_keep_fraction * N))`` weights (N = all weights in the scope), or
    all of its weights if it has fewer; the global target is still met exactly.
    """

    allocation: AllocationName = opt("global", "how scores become a mask: global, layerwise, erk, lamp")
    min_keep: int = opt(1, "MT rule: weights every layer keeps at least (global/lamp)", ge=0)
    min_keep_fraction: float = opt(
        0.0, "MT rule: fraction of all scope weights every layer keeps at least (global/lamp)", ge=0, lt=1
    )
    erk_power_scale: float = opt(1.0, "ERK allocation: exponent of the Erdos-Renyi ratio", ge=0)
    prev_mask: Mapping[str, Tensor] | None = object_opt(
        None, "a previous mask; weights it removed stay removed (gradual / iterative pruning)"
    )


def allocation_kwargs(options: AllocationOptions) -> dict[str, Any]:
    """The keyword arguments of :func:`~sparsefl.pruning.allocation.allocate` held in ``options``."""
    return {
        "allocation": options.allocation,
        "min_keep": options.min_keep,
        "min_keep_fraction": options.min_keep_fraction,
        "erk_power_scale": options.erk_power_scale,
        "prev_mask": options.prev_mask,
    }


def parse_options(cls: type, options: Mapping[str, Any], prefix: str) -> Any:
    """Build the options dataclass ``cls`` from keyword options, validating every one.

    Unknown names, wrong types and out-of-range values raise :class:`ConfigError` naming
    ``prefix.option``. Object-valued options (masks) are converted to :class:`Mask`.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in options.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}", value, "known options: " + ", ".join(fields))
    simple = {k: v for k, v in options.items() if not fields[k].metadata.get("object")}
    built = build(cls, simple, prefix + ".")
    objects: dict[str, Any] = {}
    for key, value in options.items():
        if not fields[key].metadata.get("object") or value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"{prefix}.{key}", value, "a mask (mapping of name -> bool tensor)")
        try:
            objects[key] = value if isinstance(value, Mask) else Mask(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{prefix}.{key}", "<mask>", f"a valid mask ({e})") from None
    return dataclasses.replace(built, **objects) if objects else built


def check_sparsity(sparsity: Any, key: str = "sparsity") -> float:
    """``sparsity`` as a float, or ConfigError unless it is a number with ``0 <= s < 1``."""
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, numbers.Real)
        or not math.isfinite(float(sparsity))
        or not 0 <= float(sparsity) < 1
    ):
        raise ConfigError(key, sparsity, "a number with 0 <= sparsity < 1 (the fraction of scope weights removed)")
    return float(sparsity)


# --------------------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------------------


def as_batches(data: Any, device: torch.device) -> list[Batch] | None:
    """Normalise ``data`` to a list of ``(inputs, targets)`` batches on ``device``.

    ``data`` is ``None``, one ``(inputs, targets)`` pair of tensors, or an iterable of such pairs
    (a list, a DataLoader). The batches are materialised once, so an iterator is consumed once.
    """
    if data is None:
        return None

    def pair(item: Any) -> Batch:
        if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
            return item[0].to(device), item[1].to(device)
        raise ConfigError(
            "data", type(item).__name__, "an (inputs, targets) pair of tensors or an iterable of such pairs"
        )

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return [pair(data)]
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise ConfigError(
            "data", type(data).__name__, "an (inputs, targets) pair of tensors or an iterable of such pairs"
        )
    batches = [pair(b) for b in data]
    if not batches:
        raise ConfigError("data", "<empty>", "at least one (inputs, targets) batch")
    return batches


def resolve_scope(model: nn.Module, scope: Iterable[str] | None, keep_first: bool, keep_last: bool) -> list[str]:
    """The prunable state_dict names: ``scope`` checked against the model, or the default scope."""
    state = model.state_dict(keep_vars=True)
    if scope is None:
        names = default_scope(model, keep_first=keep_first, keep_last=keep_last)
        if not names:
            raise ConfigError("scope", None, "a model with at least one Conv or Linear layer to prune")
        return names
    if isinstance(scope, str):
        raise ConfigError("scope", scope, "a list of state_dict names (not a single string)")
    names = list(scope)
    if not names:
        raise ConfigError("scope", names, "at least one state_dict name")
    if len(set(names)) != len(names):
        raise ConfigError("scope", names, "names without repetition")
    for n in names:
        if n not in state:
            raise ConfigError("scope", n, "state_dict names of the model, e.g. " + ", ".join(list(state)[:4]))
        if not state[n].is_floating_point():
            raise ConfigError("scope", n, "floating-point tensors (weights)")
    return names


@dataclass
class PruneContext:
    """Everything a criterion may read. ``model`` is the user's model: never written to.

    Attributes
    ----------
    model:
        The user's model (read only).
    scope:
        Prunable state_dict names, in the model's order.
    batches:
        The data as a list of ``(inputs, targets)`` batches on the model's device, or ``None``.
    loss_fn:
        ``loss_fn(outputs, targets) -> scalar``; cross-entropy unless the user gave one.
    loss_given:
        Whether the user passed ``loss_fn`` (Skeletonization then uses it instead of its error).
    seed:
        Seed of every random draw the criterion makes.
    criterion:
        The registered name (for error messages and seed derivation).
    """

    model: nn.Module
    scope: list[str]
    batches: list[Batch] | None
    loss_fn: LossFn
    loss_given: bool
    seed: int
    criterion: str

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter or buffer (CPU for an empty model)."""
        for t in self.model.state_dict().values():
            return t.device
        return torch.device("cpu")

    def require_data(self) -> list[Batch]:
        """The batches, or ConfigError explaining that this criterion scores on data."""
        if self.batches is None:
            raise ConfigError(
                "data",
                None,
                f"an (inputs, targets) batch or an iterable of batches: criterion "
                f"'{self.criterion}' scores weights on data",
            )
        return self.batches

    def input_shape(self, given: tuple[int, ...] | None) -> tuple[int, ...]:
        """Shape of one input sample: the ``input_shape`` option, else taken from the data."""
        if given is not None:
            if not given or any(d < 1 for d in given):
                raise ConfigError(f"{self.criterion}.input_shape", given, "positive dimensions")
            return tuple(given)
        if self.batches is not None:
            return tuple(self.batches[0][0].shape[1:])
        raise ConfigError(
            f"{self.criterion}.input_shape",
            None,
            "the shape of one input sample, e.g. input_shape=(3, 32, 32), or data to take it from",
        )

    def weights(self) -> dict[str, Tensor]:
        """Detached copies of the scope tensors (as in ``model.state_dict()``)."""
        state = self.model.state_dict()
        return {n: state[n].detach().clone() for n in self.scope}

    def working_copy(self, *, train: bool, dtype: torch.dtype | None = None) -> nn.Module:
        """A deep copy of the model to compute on: gradients cleared, mode set, scope tensors
        requiring grad. Nothing done to it reaches the user's model."""
        net = copy.deepcopy(self.model)
        if dtype is not None:
            net = net.to(dtype)
        net.train(train)
        for p in net.parameters():
            p.grad = None
        params = dict(net.named_parameters(remove_duplicate=False))
        for n in self.scope:
            if n in params:
                params[n].requires_grad_(True)
        return net

    def scope_params(self, net: nn.Module) -> dict[str, nn.Parameter]:
        """The scope's parameters of a working copy (ConfigError if a name is a buffer)."""
        params = dict(net.named_parameters(remove_duplicate=False))
        missing = [n for n in self.scope if n not in params]
        if missing:
            raise ConfigError("scope", missing[0], f"parameters (criterion '{self.criterion}' needs gradients)")
        return {n: params[n] for n in self.scope}

    def data_loss(self, forward: Callable[[Tensor], Tensor], batch: Batch) -> Tensor:
        """The loss of one batch under ``forward``."""
        x, y = batch
        return self.loss_fn(forward(x), y)


@contextlib.contextmanager
def forked_rng(seed: int, device: torch.device, *purpose: object) -> Iterator[None]:
    """Run a block with torch's global RNG (CPU, and the model's CUDA device) seeded for
    ``purpose`` and restored afterwards: dropout inside scoring passes becomes a function of the
    seed, and the caller's random stream is untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        s = derive_seed(seed, *purpose)
        torch.manual_seed(s)
        yield


# --------------------------------------------------------------------------------------------------
# Criterion base and registration
# --------------------------------------------------------------------------------------------------


class Criterion:
    """Base of every pruning criterion: ``score`` then ``allocate``, unless ``prune`` is overridden.

    Subclasses set the class attributes and implement :meth:`score` (and :meth:`prune` when the
    criterion owns its loop, as iterative or structured criteria do).

    Attributes
    ----------
    Options:
        The typed options dataclass (validated by :func:`parse_options`).
    needs_data:
        Whether scoring requires ``(inputs, targets)`` batches.
    has_scores:
        Whether :meth:`score` gives per-weight scores (False for rate-distortion, which allocates
        from distortion curves instead).
    per_layer:
        Whether the default allocation fixes each layer's density (the exactness contract is then
        per layer rather than global).
    structured:
        Whether masks remove whole output channels (exactness is then within one channel).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = AllocationOptions
    needs_data: ClassVar[bool] = False
    has_scores: ClassVar[bool] = True
    per_layer: ClassVar[bool] = False
    structured: ClassVar[bool] = False

    def __init__(self, options: Any) -> None:
        self.options = options

    def score(self, ctx: PruneContext) -> dict[str, Tensor]:
        """One-shot per-weight scores (higher = more important), shaped like the weights."""
        raise NotImplementedError

    def prune(self, ctx: PruneContext, sparsity: float) -> Mask:
        """Score, then allocate with the options' allocation rule."""
        from sparsefl.pruning.allocation import allocate

        return allocate(self.score(ctx), sparsity, **allocation_kwargs(self.options))


def register_criterion(name: str) -> Callable[[type[Criterion]], type[Criterion]]:
    """Class decorator: register a :class:`Criterion` in ``CRITERIA`` with its Options class."""

    def deco(cls: type[Criterion]) -> type[Criterion]:
        cls.name = name
        CRITERIA.register(name, config_cls=cls.Options)(cls)
        return cls

    return deco


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy (the default ``loss_fn``)."""
    return F.cross_entropy(outputs, targets)


def detached_cpu(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Scores as plain CPU tensors (values to send, not live graph nodes)."""
    return {n: s.detach().to("cpu").clone() for n, s in scores.items()}
