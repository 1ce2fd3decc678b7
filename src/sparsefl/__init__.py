"""sparsefl: sparse federated learning with honest byte and FLOP accounting.

The curated public API; importing the package fills every registry (datasets, partitioners,
models, methods, pruning criteria, codecs).
"""

from sparsefl import comm, data, methods, models, pruning  # noqa: F401  (fill the registries)
from sparsefl.config import ExperimentConfig, load_config
from sparsefl.errors import ConfigError, DataError, DecodeError, RunFolderError, SparseflError
from sparsefl.masks import Mask, default_scope
from sparsefl.methods.base import Method
from sparsefl.protocol.messages import ServerState
from sparsefl.pruning import prune
from sparsefl.state import state_sha256


def load_run(path: str, *, model=None):  # type: ignore[no-untyped-def]
    """The trained model of the finished run in ``path``, its mask and its input transform:
    ``r.model(r.transform(x))`` gives the logits of raw inputs ``x`` (see ``docs/run-folder.md``).

    For a run of a user module, pass a module of its class as ``model``.
    """
    from sparsefl.experiment.artifacts import load_run as load

    return load(path, model=model)


def run(cfg: ExperimentConfig, out: str, *, model=None, force: bool = False) -> dict:  # type: ignore[no-untyped-def]
    """Run an experiment into the folder ``out``; return its summary (see ``summary.json``).

    ``model`` may be any ``nn.Module`` taking the dataset's input shape; by default the model
    named in ``cfg.model`` is built. The run uses the engine ``cfg.engine`` names.
    """
    from sparsefl.apps import run as run_on_engine

    return run_on_engine(cfg, out, model=model, force=force)


__all__ = [
    "ConfigError",
    "DataError",
    "DecodeError",
    "ExperimentConfig",
    "Mask",
    "Method",
    "RunFolderError",
    "ServerState",
    "SparseflError",
    "default_scope",
    "load_config",
    "load_run",
    "prune",
    "run",
    "state_sha256",
]
__version__ = "0.1.0"
