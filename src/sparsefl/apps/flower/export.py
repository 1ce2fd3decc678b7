"""Write a Flower app folder that runs one sparsefl experiment (``sparsefl flower export``).

The folder is what ``flwr run DIR <superlink>`` takes::

    DIR/pyproject.toml            [project] + [tool.flwr.app] (components, run config)
    DIR/sparsefl_app/server_app.py  re-exports sparsefl.apps.flower.server_app:app
    DIR/sparsefl_app/client_app.py  re-exports sparsefl.apps.flower.client_app:app
    DIR/README.md                 how to run it

The app's modules are two-line re-exports, so the Flower App Bundle (FAB) stays a few KB and
the code that runs is the installed ``sparsefl[flower]`` on the SuperLink's machine and on
every device. The experiment is the run config (:mod:`sparsefl.apps.flower.options`).
``sparsefl run --set engine=flower-sim|flower-local`` uses this same export, so the exported
app is the code path the tests run. This module does not import Flower.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sparsefl.apps.flower.options import AppOptions
from sparsefl.config import ExperimentConfig
from sparsefl.state import atomic_write_text

APP_PACKAGE = "sparsefl_app"
FLWR_REQUIREMENT = "flwr[simulation]==1.41.0"


def toml_value(v: Any) -> str:
    """A TOML scalar (str, int, float, bool)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("-inf" if v < 0 else "inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        # JSON string escapes are valid TOML basic-string escapes; TOML also wants DEL escaped
        return json.dumps(v).replace("\x7f", "\\u007f")
    raise TypeError(f"not a TOML scalar: {v!r}")


def pyproject_text(opts: AppOptions, name: str = "sparsefl-app", version: str | None = None) -> str:
    """The app's ``pyproject.toml``."""
    from sparsefl import __version__

    cfg = opts.experiment()
    version = version or __version__
    lines = [
        "# Written by `sparsefl flower export`: a Flower app that runs one sparsefl experiment.",
        f"# method={cfg.method.name} data={cfg.data.name} clients={cfg.federation.num_clients} "
        f"rounds={cfg.federation.rounds}. Run it with:  flwr run <this folder> <your-superlink>",
        "# The SuperLink machine and every SuperNode need `pip install sparsefl[flower]`; start the",
        "# SuperLink with --disable-runtime-dependency-installation (the dependencies below are not",
        "# fetched then).",
        "[project]",
        f"name = {toml_value(name)}",
        f"version = {toml_value(version)}",
        'description = "sparsefl experiment as a Flower app"',
        'license = "Apache-2.0"',
        f"dependencies = [{toml_value(f'sparsefl[flower]=={__version__}')}, {toml_value(FLWR_REQUIREMENT)}]",
        "",
        "[tool.flwr.app]",
        'publisher = "sparsefl"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{APP_PACKAGE}.server_app:app"',
        f'clientapp = "{APP_PACKAGE}.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        "# sparsefl-config: the whole experiment as JSON; change single keys with sparsefl-set, e.g.",
        "#   flwr run . my-superlink --run-config \"sparsefl-set='federation.rounds=5 local.lr=0.1'\"",
    ]
    for key, value in opts.to_run_config().items():
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


_SERVER = '''"""ServerApp of this app: sparsefl's (the code is the installed sparsefl[flower])."""

from sparsefl.apps.flower.server_app import app

__all__ = ["app"]
'''

_CLIENT = '''"""ClientApp of this app: sparsefl's (the code is the installed sparsefl[flower])."""

from sparsefl.apps.flower.client_app import app

__all__ = ["app"]
'''

_README = """# sparsefl experiment as a Flower app

Written by `sparsefl flower export`. The experiment is `sparsefl-config` in `pyproject.toml`;
the run folder (metrics.jsonl, summary.json, model) is written by the ServerApp to
`sparsefl-out`, relative to the working directory of the SuperLink's ServerApp process.

1. Install sparsefl with its Flower extra on the SuperLink machine and on every device:
   `pip install "sparsefl[flower]"`.
2. Start the SuperLink with `--disable-runtime-dependency-installation` and one SuperNode per
   device (the ServerApp waits for `sparsefl-nodes` of them), e.g. on localhost:
   `flower-superlink --insecure --disable-runtime-dependency-installation`
   `flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9200`
3. `flwr run . <superlink-connection> --stream`

TLS and SuperNode authentication for real deployments: see sparsefl's docs/flower.md.
"""


def export_app(folder: str | Path, opts: AppOptions, *, name: str = "sparsefl-app") -> Path:
    """Write the Flower app for ``opts`` into ``folder`` (created; files overwritten).

    The options are validated first (the experiment is resolved), so a bad config fails here
    rather than on the SuperLink.
    """
    opts.experiment()
    root = Path(folder)
    pkg = root / APP_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "pyproject.toml", pyproject_text(opts, name))
    atomic_write_text(pkg / "__init__.py", '"""A sparsefl experiment as a Flower app (sparsefl flower export)."""\n')
    atomic_write_text(pkg / "server_app.py", _SERVER)
    atomic_write_text(pkg / "client_app.py", _CLIENT)
    atomic_write_text(root / "README.md", _README)
    return root


def export_experiment(
    folder: str | Path,
    cfg: ExperimentConfig,
    *,
    out: str = "runs/flower",
    nodes: int = 1,
    name: str = "sparsefl-app",
    **kw: Any,
) -> Path:
    """Write the Flower app for ``cfg`` (``kw``: further :class:`AppOptions` fields)."""
    return export_app(folder, AppOptions.for_experiment(cfg, out=out, nodes=nodes, **kw), name=name)
