"""Pruning: score, then allocate, then schedule, three parts that are swapped independently.

* :func:`prune` -- one call: a criterion's scores turned into a mask at an exact sparsity (or the
  criterion's own loop for iterative and structured ones). Never changes the model.
* :func:`score` and :func:`allocate` -- the two halves, so that federated clients can score on
  their data and the server can average the scores and allocate.
* :mod:`~sparsefl.pruning.dst` -- dynamic sparse training: one RigL / SET drop-and-regrow step
  at fixed per-layer density.
* :mod:`~sparsefl.pruning.schedules` -- gradual (Zhu & Gupta) and exponential (SynFlow) targets.

Criteria register in :data:`sparsefl.registry.CRITERIA`: random, magnitude, global_magnitude,
lamp, snip, grasp, synflow, prospr, rd, skeletonization.
"""

from sparsefl.pruning import criteria  # noqa: F401  (fills the CRITERIA registry)
from sparsefl.pruning.allocation import (
    ALLOCATIONS,
    allocate,
    erk_densities,
    lamp_scores,
    rd_dp_allocate,
    topk_mask,
)
from sparsefl.pruning.api import prune, score, skeletonize
from sparsefl.pruning.criteria.rd import rd_curves, rd_mask
from sparsefl.pruning.criteria.skeletonization import Skeleton, channel_mask
from sparsefl.pruning.dst import cosine_fraction, drop_and_grow, rigl_step, set_step
from sparsefl.pruning.schedules import exponential_densities, gradual_sparsity

__all__ = [
    "ALLOCATIONS",
    "Skeleton",
    "allocate",
    "channel_mask",
    "cosine_fraction",
    "drop_and_grow",
    "erk_densities",
    "exponential_densities",
    "gradual_sparsity",
    "lamp_scores",
    "prune",
    "rd_curves",
    "rd_dp_allocate",
    "rd_mask",
    "rigl_step",
    "score",
    "set_step",
    "skeletonize",
    "topk_mask",
]
