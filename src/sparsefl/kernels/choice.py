"""Per-layer kernel choice by a quick measurement, cached for the process.

A sparse kernel is worth it only where it is faster on the actual shape and density: on a
2-vCPU x86 CPU with PyTorch 2.13, CSR linear layers break even near 80% sparsity, and unfold +
CSR convolutions lose to oneDNN almost everywhere (0.15-0.48x dense on ResNet-18's layers).
So the choice is measured, never assumed:
:func:`choose` times every candidate interleaved with the dense reference and picks a sparse
kernel only when its median is below the dense median by a safety margin; otherwise, or on any
doubt, the dense reference. Decisions are cached per key (layer kind, shape, batch size and
density bucket) for the process.

Reproducibility: the choice depends on timing, and the kernels differ in floating-point summation
order (not in what they compute). A method using ``kernel=auto`` is therefore equal across runs to
about 1e-6, not bit for bit; pin ``dense`` or ``csr`` for bit-identical reruns (and across
``jobs``, where each worker process measures for itself).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping

#: process-wide cache: key -> chosen candidate name
_CACHE: dict[Hashable, str] = {}


def density_bucket(density: float, step: float = 0.05) -> float:
    """``density`` rounded to a multiple of ``step`` (the cache key's density part)."""
    return round(round(density / step) * step, 6)


def clear_cache() -> None:
    """Forget every cached decision (tests; a new machine state)."""
    _CACHE.clear()


def cached(key: Hashable) -> str | None:
    """The cached decision for ``key``, or None."""
    return _CACHE.get(key)


def choose(
    key: Hashable,
    candidates: Mapping[str, Callable[[], object]],
    *,
    reference: str = "dense",
    repeats: int = 5,
    margin: float = 1.1,
    timer: Callable[[], float] = time.perf_counter,
) -> str:
    """The fastest candidate for ``key`` (cached), never one slower than ``reference``.

    Each candidate is a callable running one representative step (e.g. forward + backward of the
    layer). After one warm-up call each, the candidates run ``repeats`` times, interleaved
    (``reference`` first in every round, so load changes hit all alike); a candidate other than
    the reference wins only if ``margin * median(candidate) < median(reference)``. A candidate
    that raises is dropped.

    Parameters
    ----------
    key:
        Cache key; a cached decision is returned without measuring.
    candidates:
        Name -> step callable; must contain ``reference``.
    timer:
        Clock (injectable for deterministic tests).
    """
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if reference not in candidates:
        raise ValueError(f"the candidates must include the reference {reference!r}")
    names = [reference] + [n for n in candidates if n != reference]
    alive = []
    for n in names:
        try:
            candidates[n]()
            alive.append(n)
        except Exception:  # noqa: BLE001 - an unusable kernel is simply not chosen
            if n == reference:
                raise
    times: dict[str, list[float]] = {n: [] for n in alive}
    for _ in range(repeats):
        for n in alive:
            t0 = timer()
            candidates[n]()
            times[n].append(timer() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    best = reference
    for n in alive:
        if n != reference and margin * med[n] < med[reference] and med[n] < med[best]:
            best = n
    _CACHE[key] = best
    return best


__all__ = ["cached", "choose", "clear_cache", "density_bucket"]
