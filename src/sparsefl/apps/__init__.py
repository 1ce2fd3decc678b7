"""Applications on top of the experiment layer: the Flower ServerApp, ClientApp, export and
local launcher (:mod:`.flower`), and :func:`run`, which runs an experiment on the engine its
configuration names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from sparsefl.config import ExperimentConfig
from sparsefl.experiment.runner import ProgressFn, run_experiment


def run(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` into ``out`` on its ``engine``: embedded here, or Flower (simulation or local
    SuperNodes) through :func:`sparsefl.apps.flower.run_on_flower`; returns the summary."""
    if cfg.engine == "embedded":
        return run_experiment(cfg, out, model=model, force=force, progress=progress, log=log)
    from sparsefl.apps.flower import run_on_flower  # Flower is the optional extra sparsefl[flower]

    return run_on_flower(cfg, out, model=model, force=force, progress=progress, log=log)


__all__ = ["run"]
