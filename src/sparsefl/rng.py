"""Explicit randomness: every random draw comes from a generator derived from
``(seed, purpose, ...)`` so that results never depend on call order or global state.

Library code never seeds the global generators; model construction uses
:func:`seeded_torch` which forks and restores the global torch state.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed determined by ``seed`` and the ``purpose`` path (e.g. ``"sample", round``)."""
    text = "/".join([str(seed), *map(str, purpose)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def np_rng(seed: int, *purpose: object) -> np.random.Generator:
    """A NumPy generator for one purpose."""
    return np.random.default_rng(derive_seed(seed, *purpose))


def torch_gen(seed: int, *purpose: object) -> torch.Generator:
    """A CPU torch generator for one purpose."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *purpose))
    return g


@contextlib.contextmanager
def seeded_torch(seed: int, *purpose: object) -> Iterator[None]:
    """Run a block (e.g. ``nn.Module`` construction, whose initialisers use the global
    generator) with the global torch RNG seeded for ``purpose``, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *purpose))
        yield
