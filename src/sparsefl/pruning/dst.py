"""Dynamic sparse training (DST): one prune-and-regrow step on a :class:`Mask`, at fixed density.

RigL (Evci et al., ICML 2020, https://arxiv.org/abs/1911.11134) and SET (Mocanu et al., Nature
Communications 2018, https://arxiv.org/abs/1707.04780) change a sparse network's connectivity
during training without changing its size: in every layer, drop the kept weights of smallest
magnitude and regrow as many removed ones, chosen by gradient magnitude (RigL) or at random (SET).
Federated methods (FedDST, FedTiny, ...) run this step on clients or on the server, so it lives
here as pure functions on masks and tensors: no model, no optimiser, no global randomness.

Counts and order are exact: per layer ``k = floor(fraction * kept)`` (RigL's truncation), capped
by the number of positions that were removed before the step, so the layer's kept count never
changes. Drop candidates are the kept weights, grow candidates the weights removed *before* the
step, so a weight dropped in a step is never regrown in the same step (RigL's code lets the
grow scores see just-dropped positions; its zero-initialisation then makes such a pair a no-op
except for the weight's value; excluding them keeps the change count honest). Both selections
use :func:`~sparsefl.pruning.allocation.topk_mask`: ties go to the lower flat index, so equal
inputs give equal masks on every machine. Newly grown weights are the caller's to zero-initialise
(:func:`grown`); dropped weights are the caller's to zero (:meth:`Mask.apply_`).

Also here: :func:`dense_grads` (RigL's regrowth score on one batch) and FedDST's server side,
:func:`vote_shares` and :func:`consensus_mask` (the magnitude consensus of the clients' masks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparsefl.errors import ConfigError
from sparsefl.masks import Mask
from sparsefl.pruning.allocation import topk_mask

Tensor = torch.Tensor

__all__ = [
    "consensus_mask",
    "cosine_fraction",
    "dense_grads",
    "drop_and_grow",
    "dropped",
    "grown",
    "layer_k",
    "rigl_step",
    "set_step",
]


def _fraction_for(fraction: float | Mapping[str, float], name: str) -> float:
    f = fraction[name] if isinstance(fraction, Mapping) else fraction
    f = float(f)
    if not 0.0 <= f <= 1.0 or math.isnan(f):
        raise ConfigError("fraction", f, "a number with 0 <= fraction <= 1 (share of a layer's kept weights)")
    return f


def layer_k(fraction: float, kept: int, removed: int) -> int:
    """Weights one drop-and-regrow step replaces in a layer: ``floor(fraction * kept)``, capped
    by the removed count (a layer cannot regrow more positions than it has removed)."""
    return max(0, min(math.floor(fraction * kept + 1e-9), removed))


def drop_and_grow(
    mask: Mask,
    weights: Mapping[str, Tensor],
    grow_scores: Mapping[str, Tensor],
    fraction: float | Mapping[str, float],
    *,
    drop_scores: Mapping[str, Tensor] | None = None,
) -> Mask:
    """One drop-and-regrow step per layer, keeping every layer's density.

    Parameters
    ----------
    mask:
        The current mask (True = kept); the result covers the same names.
    weights:
        name -> current weights; ``|w|`` ranks the kept weights for dropping (smallest first).
    grow_scores:
        name -> scores; the removed positions with the largest scores are regrown.
    fraction:
        Share of each layer's kept weights to replace, ``0 <= fraction <= 1``; one number for all
        layers or a mapping name -> fraction. ``k = floor(fraction * kept)``, capped by the
        number of removed positions.
    drop_scores:
        name -> scores replacing ``|w|`` for dropping (lowest dropped first).

    Returns
    -------
    Mask
        The new mask: per layer exactly as many kept weights as before; no position is both
        dropped and regrown.
    """
    out: dict[str, Tensor] = {}
    for name, m in mask.items():
        f = _fraction_for(fraction, name)
        flat = m.reshape(-1)
        n_kept = int(flat.sum())
        n_removed = flat.numel() - n_kept
        k = layer_k(f, n_kept, n_removed)
        if k <= 0:
            out[name] = m.clone()
            continue
        src = drop_scores[name] if drop_scores is not None else weights[name].detach().abs()
        drop_s = src.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        grow_s = grow_scores[name].detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if drop_s.numel() != flat.numel() or grow_s.numel() != flat.numel():
            raise ValueError(f"scores for {name!r} do not match the mask's shape {tuple(m.shape)}")
        # NaN scores rank lowest (topk_mask); -inf marks positions that are not candidates
        # survivors: the n_kept - k highest drop scores among kept weights (removed ones at -inf)
        keep = topk_mask(torch.where(flat, drop_s, -math.inf), n_kept - k) & flat
        # regrown: the k highest grow scores among the positions removed before this step
        grow = topk_mask(torch.where(flat, -math.inf, grow_s), k) & ~flat
        out[name] = (keep | grow).view(m.shape)
    return Mask(out)


def rigl_step(
    mask: Mask,
    weights: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    fraction: float | Mapping[str, float],
) -> Mask:
    """RigL (Evci et al. 2020, https://arxiv.org/abs/1911.11134): drop smallest ``|w|``, regrow
    the removed weights with the largest ``|grad|`` (the dense gradient of the loss)."""
    return drop_and_grow(mask, weights, {n: grads[n].detach().abs() for n in mask}, fraction)


def set_step(
    mask: Mask,
    weights: Mapping[str, Tensor],
    fraction: float | Mapping[str, float],
    gen: torch.Generator,
) -> Mask:
    """SET (Mocanu et al. 2018, https://arxiv.org/abs/1707.04780): drop smallest ``|w|``, regrow
    uniformly at random. The random scores are drawn from ``gen`` in mask order, one per weight,
    so the result depends only on the generator's state."""
    scores = {n: torch.rand(m.numel(), generator=gen, dtype=torch.float64).view(m.shape) for n, m in mask.items()}
    return drop_and_grow(mask, weights, scores, fraction)


def cosine_fraction(step: int, total: int, initial: float) -> float:
    """RigL's cosine-annealed update fraction ``alpha_t = alpha / 2 * (1 + cos(pi * t / T_end))``.

    ``step`` is ``t`` (a training step or a round), ``total`` is ``T_end`` (the last step at
    which masks change); beyond ``T_end`` the fraction is 0.
    """
    if total <= 0 or step >= total:
        return 0.0
    return float(initial) / 2.0 * (1.0 + math.cos(math.pi * max(step, 0) / total))


def grown(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per layer, the positions kept in ``new`` but not in ``old`` (to zero-initialise)."""
    return {n: new[n] & ~old[n] for n in new if n in old}


def dropped(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per layer, the positions kept in ``old`` but not in ``new``."""
    return {n: old[n] & ~new[n] for n in new if n in old}


def dense_grads(model: nn.Module, x: Tensor, y: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """The dense cross-entropy gradient of the parameters ``names`` on the batch ``(x, y)``
    (RigL's regrowth score), in training mode, leaving the model's buffers (BatchNorm running
    statistics) and ``.grad`` fields as they were."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), [params[n] for n in names])
    finally:
        model.train(was_training)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
    return {n: g.detach() for n, g in zip(names, grads)}


def vote_shares(masks: Sequence[Mapping[str, Tensor]], weights: Sequence[float], like: Mask) -> dict[str, Tensor]:
    """Per coordinate of ``like``'s tensors, the ``weights``-weighted share of ``masks`` keeping it
    (float64 in [0, 1]; a mask that does not name a tensor counts as keeping none of it)."""
    total = float(sum(weights)) or 1.0
    out = {n: torch.zeros(m.shape, dtype=torch.float64) for n, m in like.items()}
    for mask, w in zip(masks, weights):
        for n in out:
            if n in mask:
                out[n] += mask[n].to(device="cpu", dtype=torch.float64) * (float(w) / total)
    return out


def consensus_mask(
    params: Mapping[str, Tensor], votes: Mapping[str, Tensor], counts: Mapping[str, int], fallback: Mapping[str, Tensor]
) -> Mask:
    """FedDST's server mask: the magnitude consensus of the sparse weighted average.

    Bibikar et al., AAAI 2022, https://arxiv.org/abs/2112.09824 (reference code: the union of
    the clients' masks re-pruned by layer-wise magnitude).

    Parameters
    ----------
    params:
        name -> aggregated weights (each averaged over the clients that kept it).
    votes:
        name -> share of the clients keeping each weight (:func:`vote_shares`); > 0 = voted.
    counts:
        name -> how many weights the layer keeps.
    fallback:
        name -> scores (magnitudes) for filling a layer that too few clients voted for.

    Returns
    -------
    Mask
        Per layer exactly ``counts[name]`` kept: the voted weights of largest ``|params|``, then
        zero-valued voted ones (just regrown) by their votes, then the rest by ``|fallback|``.
        Ties go to the lower index.
    """
    out: dict[str, Tensor] = {}
    for n, v in votes.items():
        w = params[n].detach().reshape(-1).to(torch.float64).abs()
        vote = v.reshape(-1).to(torch.float64)
        k = counts[n]
        voted = vote > 0
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        tiers = [
            (voted & (w > 0), w),
            (voted & (w == 0), vote),
            (~voted, fallback[n].detach().reshape(-1).to(torch.float64).abs()),
        ]
        for eligible, score in tiers:
            need = k - int(keep.sum())
            if need <= 0:
                break
            eligible = eligible & ~keep
            keep |= topk_mask(torch.where(eligible, score, -math.inf), min(need, int(eligible.sum())))
        out[n] = keep.view(v.shape)
    return Mask(out)
