"""The public entry points: :func:`prune` (score + allocate, or a criterion's own loop) and
:func:`score` (the one-shot half that federated clients run; the server averages the scores and
calls :func:`~sparsefl.pruning.allocation.allocate`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from sparsefl.errors import ConfigError
from sparsefl.masks import Mask
from sparsefl.pruning.base import (
    Criterion,
    LossFn,
    PruneContext,
    as_batches,
    check_sparsity,
    default_loss,
    detached_cpu,
    forked_rng,
    parse_options,
    resolve_scope,
)
from sparsefl.registry import CRITERIA

__all__ = ["prune", "score", "skeletonize"]


def _setup(
    model: nn.Module,
    criterion: str,
    data: Any,
    loss_fn: LossFn | None,
    scope: Iterable[str] | None,
    seed: int,
    options: dict[str, Any],
) -> tuple[Criterion, PruneContext]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cls = CRITERIA.get(criterion)
    opts = parse_options(cls.Options, options, criterion)
    names = resolve_scope(model, scope, opts.keep_first, opts.keep_last)
    ctx = PruneContext(
        model=model,
        scope=names,
        batches=None,
        loss_fn=loss_fn or default_loss,
        loss_given=loss_fn is not None,
        seed=int(seed),
        criterion=criterion,
    )
    ctx.batches = as_batches(data, ctx.device)
    if cls.needs_data:
        ctx.require_data()
    prev = getattr(opts, "prev_mask", None)
    if prev is not None:
        missing = [n for n in names if n not in prev]
        if missing:
            raise ConfigError(f"{criterion}.prev_mask", missing[0], "a mask naming every scope tensor")
        try:
            prev.check(model.state_dict())
        except ValueError as e:
            raise ConfigError(f"{criterion}.prev_mask", "<mask>", f"a mask shaped like the model ({e})") from None
    return cls(opts), ctx


def prune(
    model: nn.Module,
    criterion: str,
    sparsity: float,
    *,
    data: Any = None,
    loss_fn: LossFn | None = None,
    scope: Iterable[str] | None = None,
    seed: int = 0,
    **options: Any,
) -> Mask:
    """Prune ``model`` with ``criterion`` to ``sparsity``; return the mask (True = kept).

    The model is never changed: weights, buffers (BatchNorm running statistics included), hooks,
    train/eval mode, ``requires_grad`` flags and ``.grad`` fields are as before the call.

    Parameters
    ----------
    model:
        Any ``nn.Module``.
    criterion:
        A name registered in :data:`sparsefl.registry.CRITERIA` (``sparsefl list`` shows them).
    sparsity:
        Fraction of the scope's weights removed, ``0 <= sparsity < 1``.
    data:
        ``(inputs, targets)`` tensors or an iterable of such batches; required by data-dependent
        criteria (snip, grasp, prospr, skeletonization); data-free ones take the input shape from
        it when no ``input_shape`` option is given.
    loss_fn:
        ``loss_fn(outputs, targets) -> scalar`` (default: mean cross-entropy).
    scope:
        state_dict names that may be pruned (default: the weights of every Conv and Linear layer,
        less the first/last with the ``keep_first`` / ``keep_last`` options).
    seed:
        Seed of every random draw (random scores, dropout in scoring passes, random inputs).
    **options:
        The criterion's options (see its Options dataclass), e.g. ``iterations=100`` for synflow,
        and for score-based criteria the allocation options ``allocation``, ``min_keep``,
        ``min_keep_fraction``, ``erk_power_scale``, ``prev_mask``. Unknown names raise
        :class:`~sparsefl.errors.ConfigError`.

    Returns
    -------
    Mask
        Keyed by the scope's state_dict names.
    """
    sparsity = check_sparsity(sparsity)
    crit, ctx = _setup(model, criterion, data, loss_fn, scope, seed, options)
    with forked_rng(ctx.seed, ctx.device, "criterion", criterion):
        return crit.prune(ctx, sparsity)


def score(
    model: nn.Module,
    criterion: str,
    *,
    data: Any = None,
    loss_fn: LossFn | None = None,
    scope: Iterable[str] | None = None,
    seed: int = 0,
    **options: Any,
) -> dict:
    """One-shot per-weight scores of ``criterion`` (higher = more important), on CPU.

    Same arguments as :func:`prune` less the sparsity. Iterative criteria return their first
    iteration's scores (SynFlow: one pass at full density). The rate-distortion criterion has no
    per-weight scores (it allocates from distortion curves; see
    :func:`sparsefl.pruning.criteria.rd.rd_curves`) and raises ConfigError here.
    """
    crit, ctx = _setup(model, criterion, data, loss_fn, scope, seed, options)
    if not crit.has_scores:
        raise ConfigError(
            "criterion",
            criterion,
            "a criterion with per-weight scores; one that allocates by itself needs prune()",
        )
    with forked_rng(ctx.seed, ctx.device, "criterion", criterion):
        return detached_cpu(crit.score(ctx))


def skeletonize(
    model: nn.Module,
    sparsity: float,
    *,
    data: Any,
    loss_fn: LossFn | None = None,
    scope: Iterable[str] | None = None,
    seed: int = 0,
    **options: Any,
) -> Any:
    """Skeletonization with its channel information: a
    :class:`~sparsefl.pruning.criteria.skeletonization.Skeleton` holding the structured ``mask``
    (what ``prune(model, "skeletonization", ...)`` returns), the ``channel_mask`` (name -> kept
    output channels) and each channel's ``relevance``. Arguments as for :func:`prune`."""
    from sparsefl.pruning.criteria.skeletonization import skeleton

    sparsity = check_sparsity(sparsity)
    crit, ctx = _setup(model, "skeletonization", data, loss_fn, scope, seed, options)
    with forked_rng(ctx.seed, ctx.device, "criterion", "skeletonization"):
        return skeleton(ctx, crit.options, sparsity)
