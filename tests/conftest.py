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


@pytest.fixture
def interrupted_run():
    """``interrupted_run(cfg, out, at, engine=None)``: run ``cfg`` into ``out`` (on ``engine``,
    if given) and stop it with KeyboardInterrupt as round ``at`` starts, as a crash would
    (rounds before it are checkpointed)."""
    from sparsefl.experiment.runner import run_experiment
    from sparsefl.runtime.server import Server

    def run(cfg, out, at: int, engine=None) -> None:  # type: ignore[no-untyped-def]
        real = Server.train_round

        def stop(self, state, rnd):  # type: ignore[no-untyped-def]
            if rnd == at:
                raise KeyboardInterrupt
            return real(self, state, rnd)

        Server.train_round = stop  # type: ignore[method-assign]
        try:
            with pytest.raises(KeyboardInterrupt):
                run_experiment(cfg, out, engine=engine)
        finally:
            Server.train_round = real  # type: ignore[method-assign]

    return run
