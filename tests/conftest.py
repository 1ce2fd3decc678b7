"""Shared fixtures: small, fast configurations."""

from __future__ import annotations

import pytest

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.config import load_config


def tiny_overrides(**extra: object) -> list[str]:
    """A fast digits setup: 6 clients, 3 per round, 3 rounds, small batches."""
    base = {
        "federation.num_clients": 6,
        "federation.clients_per_round": 3,
        "federation.rounds": 3,
        "local.batch_size": 32,
        "data.min_samples": 5,
    }
    base.update(extra)
    out = []
    for k, v in base.items():
        out.append(f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    return out


@pytest.fixture
def tiny_cfg():
    return load_config(overrides=tiny_overrides())
