"""Seeded client sampling and the learning-rate schedule across rounds."""

from __future__ import annotations

import math

import numpy as np

from sparsefl.rng import np_rng


def sample_clients(seed: int, rnd: int, num_clients: int, k: int, attempt: int = 0) -> list[int]:
    """``k`` distinct client ids for round ``rnd`` (sorted), drawn uniformly without replacement
    from a generator derived from ``(seed, "sample", rnd, attempt)``: independent of anything
    else that happened in the run, so resuming at any round samples the same clients."""
    rng = np_rng(seed, "sample", rnd, attempt)
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def round_lr(lr: float, lr_end: float | None, rnd: int, rounds: int) -> float:
    """Exponential decay across rounds, as in ZeroFL (Qiu et al., ICLR 2022), with the sign of
    the paper's printed exponent corrected (as printed, the rate would grow):
    ``lr_t = lr * exp((t / (T - 1)) * log(lr_end / lr))`` for round t = 0..T-1 (``rnd`` is
    1-based), so the last round runs at ``lr_end``; constant when ``lr_end`` is None."""
    if lr_end is None or rounds <= 1:
        return lr
    t = (rnd - 1) / (rounds - 1)
    return float(lr * math.exp(t * math.log(lr_end / lr)))


def weights_of(num_examples: list[int]) -> np.ndarray:
    """Sample weights n_k / sum_j n_j."""
    n = np.asarray(num_examples, dtype=np.float64)
    return n / n.sum()
