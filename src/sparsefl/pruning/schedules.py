"""Schedules: how the target sparsity moves over iterations, rounds or steps.

The third of the three swappable parts of pruning (score, allocate, **schedule**). Each function
here returns *sparsities* (fractions of the scope's weights removed) or *densities* (fractions
kept), as its name says.

* :func:`gradual_sparsity` -- Zhu & Gupta (2017, "To prune, or not to prune") polynomial ramp,
  used by gradual Global MP over federated rounds or local steps.
* :func:`exponential_densities` -- SynFlow's iterative schedule ``rho ** (j / n)`` (Tanaka et al.,
  NeurIPS 2020), also the iterative rate-distortion schedule: a constant fraction of the
  survivors is removed at each iteration (Xu et al.'s ``1 - (1 - amount) ** t``).
"""

from __future__ import annotations

from sparsefl.errors import ConfigError
from sparsefl.pruning.base import check_sparsity

__all__ = ["exponential_densities", "gradual_sparsity"]


def gradual_sparsity(
    step: int,
    total_steps: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    power: float = 3,
    *,
    begin_step: int = 0,
) -> float:
    """Target sparsity at ``step`` of Zhu & Gupta's polynomial (default cubic) schedule.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / n) ** power`` for ``t_0 <= t <= t_0 + n``; before
    ``t_0`` it is ``s_i`` and after ``t_0 + n`` it is ``s_f``. With the cubic power the network is
    pruned fast early, while redundancy is high, and slowly as the target approaches.

    Parameters
    ----------
    step:
        Current step or round ``t``.
    total_steps:
        Length ``n`` of the ramp (>= 1).
    final_sparsity, initial_sparsity:
        ``s_f`` and ``s_i``, fractions of the scope's weights removed (``0 <= s < 1``).
    power:
        Exponent (3 = Zhu & Gupta; 1 = linear).
    begin_step:
        ``t_0``, the step at which the ramp starts.
    """
    s_f = check_sparsity(final_sparsity, "final_sparsity")
    s_i = check_sparsity(initial_sparsity, "initial_sparsity")
    if total_steps < 1:
        raise ConfigError("total_steps", total_steps, "an integer >= 1")
    if power <= 0:
        raise ConfigError("power", power, "a number > 0")
    progress = min(max((step - begin_step) / total_steps, 0.0), 1.0)
    if progress >= 1.0:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - progress) ** power


def exponential_densities(final_density: float, iterations: int, initial_density: float = 1.0) -> list[float]:
    """Densities ``d_0 * (d / d_0) ** (j / n)`` for ``j = 1..n`` (the last is exactly ``d``).

    SynFlow prunes to ``rho ** (j / n)`` at iteration ``j`` of ``n`` (its ``exponential``
    schedule); starting from ``initial_density`` lets iterative pruning continue from a mask.
    """
    if iterations < 1:
        raise ConfigError("iterations", iterations, "an integer >= 1")
    if not 0 < final_density <= initial_density <= 1:
        raise ConfigError("final_density", final_density, f"a number in (0, initial_density={initial_density}]")
    ratio = final_density / initial_density
    out = [initial_density * ratio ** (j / iterations) for j in range(1, iterations)]
    return out + [final_density]
