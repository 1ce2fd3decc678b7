"""FedRTS (NeurIPS 2025): federated dynamic pruning by combinatorial Thompson sampling.

"FedRTS: Federated Robust Pruning via Combinatorial Thompson Sampling" (NeurIPS 2025,
https://openreview.net/pdf?id=GkB1ZUNz83). Instead of deciding the next mask from one round's
aggregate (FedDST, PruneFL), the server keeps Beta posteriors over which weights to change and
draws the new mask from them, so that one round's noisy, heterogeneous feedback cannot flip the
topology on its own. As implemented here, after the reference code in the FedPruning library:

* every round, each client's uploaded kept weights vote for dropping its ``k`` smallest-magnitude
  kept weights per layer; the votes (sample-weighted, mixed with the aggregate's own vote by
  ``gamma``) update a per-weight Beta posterior "should be dropped" (``alpha += ratio * v``,
  ``beta += ratio * (1 - v)``; ``discount`` < 1 forgets old evidence);
* on an adjustment round clients also upload their top-``k`` mean gradients at removed positions;
  the sample-weighted votes (again mixed by ``gamma`` with the aggregated gradient's top-``k``)
  form a Beta posterior "should be grown" over the removed weights;
* the new mask is a combinatorial Thompson sample: one draw ``theta ~ Beta`` per weight, the
  ``k`` kept weights of largest drop-``theta`` leave and the ``k`` removed ones of largest
  grow-``theta`` enter (fixed density per layer); the drop posterior then starts afresh.

``k`` is RigL's cosine-decayed share of each layer's kept count. The posterior lives in
``ServerState.extra`` (checkpointed); draws come from ``(seed, "fedrts", round, layer)``.
Options and every choice where the reference is silent: ``docs/methods/fedrts.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sparsefl.config import opt
from sparsefl.errors import ConfigError
from sparsefl.masks import Mask
from sparsefl.methods.fedtiny import DstConfig, ServerMaskDst
from sparsefl.protocol.messages import Received, ServerState, StateDict
from sparsefl.pruning import allocate, drop_and_grow
from sparsefl.pruning.allocation import ALLOCATIONS, topk_mask
from sparsefl.registry import METHODS
from sparsefl.rng import np_rng

Tensor = torch.Tensor

# ServerState.extra keys (+ weight name): the drop posterior over kept weights.
ALPHA = "fedrts.alpha."
BETA = "fedrts.beta."


@dataclass(frozen=True)
class FedRTSConfig(DstConfig):
    """Options of FedRTS (docs/methods/fedrts.md)."""

    allocation: str = opt("erk", "initial magnitude mask's layer allocation: " + ", ".join(ALLOCATIONS))
    gamma: float = opt(0.5, "weight of the aggregated model's own vote against the clients' votes", ge=0, le=1)
    ratio: float = opt(1.0, "evidence one round of votes adds to a posterior (alpha/beta increments)", gt=0)
    discount: float = opt(
        1.0, "factor on the drop posterior's evidence before each round's votes (1 = keep)", gt=0, le=1
    )

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ConfigError("method.allocation", self.allocation, "one of: " + ", ".join(ALLOCATIONS))


# --------------------------------------------------------------------------------------------------
# The posterior, as pure functions (a test checks them on a hand-built case)
# --------------------------------------------------------------------------------------------------


def lowest_k(values: Tensor, kept: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` kept positions of smallest ``|values|`` (ties: lower index)."""
    score = torch.where(kept, -values.detach().abs().to(torch.float64), torch.tensor(-np.inf, dtype=torch.float64))
    return topk_mask(score, k) & kept


def drop_votes(
    kept: Tensor,
    client_weights: Sequence[Tensor],
    shares: Sequence[float],
    global_weights: Tensor,
    k: int,
    gamma: float,
) -> Tensor:
    """Per kept weight, the share of votes to drop it: ``(1 - gamma) * sum_c p_c [w in c's k
    smallest] + gamma * [w in the aggregate's k smallest]`` (0 at removed positions)."""
    v = torch.zeros(kept.shape, dtype=torch.float64)
    for w, p in zip(client_weights, shares, strict=True):
        v += p * lowest_k(w, kept, k).to(torch.float64)
    return (1 - gamma) * v + gamma * lowest_k(global_weights, kept, k).to(torch.float64)


def update_drop_posterior(
    alpha: Tensor | None, beta: Tensor | None, votes: Tensor, kept: Tensor, k: int, ratio: float, discount: float
) -> tuple[Tensor, Tensor]:
    """One round of evidence on the kept weights: a fresh posterior starts at ``alpha = beta =
    k / kept`` (the prior drop rate); then ``alpha = prior + discount * (alpha - prior) + ratio *
    v`` and likewise ``beta`` with ``1 - v``. Removed positions are left as they are."""
    prior = k / max(int(kept.sum()), 1)
    if alpha is None or beta is None:
        alpha = torch.full(kept.shape, prior, dtype=torch.float64)
        beta = torch.full(kept.shape, prior, dtype=torch.float64)
    a = prior + discount * (alpha - prior) + ratio * votes
    b = prior + discount * (beta - prior) + ratio * (1 - votes)
    return torch.where(kept, a, alpha), torch.where(kept, b, beta)


def grow_posterior(votes: Tensor, kept: Tensor, k: int, ratio: float) -> tuple[Tensor, Tensor]:
    """The grow posterior over removed weights (reference code): ``alpha = ratio * v + k / n``,
    ``beta = k / n + ratio * (n - k) / n`` where nobody voted and ``k / n`` elsewhere
    (``n`` removed weights); kept positions get ``alpha = beta = 1`` (never drawn from)."""
    n = max(int((~kept).sum()), 1)
    prior = k / n
    a = torch.where(kept, 1.0, ratio * votes + prior)
    b = torch.where(kept, 1.0, torch.where(votes == 0, prior + ratio * (n - k) / n, torch.full_like(votes, prior)))
    return a.to(torch.float64), b.to(torch.float64)


def thompson(alpha: Tensor, beta: Tensor, rng: np.random.Generator) -> Tensor:
    """One draw ``theta ~ Beta(alpha, beta)`` per coordinate (float64, from ``rng``)."""
    a = np.maximum(alpha.numpy().reshape(-1), 1e-12)
    b = np.maximum(beta.numpy().reshape(-1), 1e-12)
    return torch.from_numpy(rng.beta(a, b)).view(alpha.shape)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@METHODS.register(
    "fedrts",
    FedRTSConfig,
    summary="FedRTS (NeurIPS 2025): mask drawn by combinatorial Thompson sampling from Beta posteriors",
)
class FedRTS(ServerMaskDst):
    """FedRTS: a server-side Thompson-sampled drop-and-grow of the global mask.

    Paper: https://openreview.net/pdf?id=GkB1ZUNz83 (docs/methods/fedrts.md for every choice).

    Parameters
    ----------
    config:
        :class:`FedRTSConfig`: ``sparsity``, the schedule (``adjust_every``, ``adjust_until``,
        ``alpha``), the initial ``allocation``, ``gamma``, ``ratio`` and ``discount``.
    experiment, spec, profile:
        The experiment, the model and its FLOP profile.
    """

    config_cls = FedRTSConfig
    config: FedRTSConfig

    def init_state(self, params: StateDict, proxy: tuple[Tensor, Tensor] | None = None) -> ServerState:
        """The initial magnitude mask at the target sparsity (``allocation``), on the server."""
        mags = {n: params[n].detach().abs().to(torch.float64) for n in self.scope}
        mask = allocate(mags, self.config.sparsity, allocation=self.config.allocation)
        return ServerState(round=0, params=mask.applied(params), mask=mask)

    def aggregate(self, state: ServerState, received: Sequence[Received]) -> ServerState:
        """FedAvg of the kept weights, the drop posterior's update and, on an adjustment round,
        the Thompson-sampled drop-and-grow."""
        assert state.mask is not None
        rnd, cfg, mask = state.round + 1, self.config, state.mask
        new, grads = self._average(state, received)
        extra = dict(state.extra)
        f = self._fraction(rnd)
        total = float(sum(r.num_examples for r in received))
        shares = [r.num_examples / total for r in received]
        if f > 0 and rnd <= self.t_end:
            ks = self._layer_ks(mask, rnd)
            for n, k in ks.items():
                if k == 0:
                    continue
                kept = mask[n]
                votes = drop_votes(kept, [r.update.values[n] for r in received], shares, new[n], k, cfg.gamma)
                a, b = update_drop_posterior(
                    extra.get(ALPHA + n), extra.get(BETA + n), votes, kept, k, cfg.ratio, cfg.discount
                )
                extra[ALPHA + n], extra[BETA + n] = a, b
            if self._adjusts(rnd):
                mask = self._resample(mask, new, grads, shares, ks, extra, rnd)
                extra = {k: v for k, v in extra.items() if not k.startswith((ALPHA, BETA))}
        return ServerState(round=rnd, params=mask.applied(new), mask=mask, extra=extra)

    def _resample(
        self,
        mask: Mask,
        new: StateDict,
        grads: Sequence[Mapping[str, Tensor]],
        shares: Sequence[float],
        ks: Mapping[str, int],
        extra: Mapping[str, Tensor],
        rnd: int,
    ) -> Mask:
        """The combinatorial Thompson sample: per adjusted layer drop the ``k`` kept weights of
        largest drop-``theta`` and grow the ``k`` removed ones of largest grow-``theta``."""
        cfg = self.config
        drop_scores: dict[str, Tensor] = {}
        grow_scores: dict[str, Tensor] = {}
        frac: dict[str, float] = {n: 0.0 for n in mask}
        for n, k in ks.items():
            kept = mask[n]
            if k == 0 or ALPHA + n not in extra:
                continue
            agg_g = torch.zeros(kept.shape, dtype=torch.float64)
            votes = torch.zeros(kept.shape, dtype=torch.float64)
            for g, p in zip(grads, shares, strict=True):
                if n in g:
                    agg_g += p * g[n]
                    votes += p * ((g[n] != 0) & ~kept).to(torch.float64)
            top = topk_mask(torch.where(kept, torch.tensor(-np.inf, dtype=torch.float64), agg_g.abs()), k) & ~kept
            votes = (1 - cfg.gamma) * votes + cfg.gamma * top.to(torch.float64)
            rng = np_rng(self.experiment.seed, "fedrts", rnd, n)
            theta_drop = thompson(extra[ALPHA + n], extra[BETA + n], rng)
            ga, gb = grow_posterior(votes, kept, k, cfg.ratio)
            theta_grow = thompson(ga, gb, rng)
            drop_scores[n] = -theta_drop  # drop_and_grow drops the lowest scores
            grow_scores[n] = theta_grow
            frac[n] = k / int(kept.sum())
        for n in mask:
            drop_scores.setdefault(n, new[n].detach().abs().to(torch.float64))
            grow_scores.setdefault(n, torch.zeros(mask[n].shape, dtype=torch.float64))
        return drop_and_grow(mask, new, grow_scores, frac, drop_scores=drop_scores)
