"""``sparsefl flower export DIR --config exp.toml``: an experiment as a Flower app folder.

The folder (``pyproject.toml`` with ``[tool.flwr.app]``, and the ServerApp / ClientApp modules,
which re-export sparsefl's) is what ``flwr run DIR <superlink>`` takes to run the experiment
on a user's own SuperLink and devices. To run on Flower on this machine instead, use
``sparsefl run --set engine=flower-sim`` or ``engine=flower-local``. See ``docs/flower.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from sparsefl.cli.main import add_config_arguments, check_output, output_error
from sparsefl.config import load_config


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "flower",
        help="Flower integration: export an experiment as a Flower app",
        description="Flower integration (extra sparsefl[flower]). Run on Flower locally with "
        "`sparsefl run --set engine=flower-sim` (simulation) or `--set engine=flower-local` (SuperLink + SuperNodes).",
    )
    fsub = p.add_subparsers(dest="flower_command", required=True, metavar="SUBCOMMAND")
    e = fsub.add_parser(
        "export",
        help="write a Flower app folder for `flwr run`",
        description="Write a Flower app folder (pyproject.toml + ServerApp/ClientApp modules) that runs this "
        "experiment with `flwr run DIR <superlink>` on your own SuperLink and SuperNodes.",
    )
    e.add_argument("dir", type=Path, help="folder to write (created; existing app files are overwritten)")
    add_config_arguments(e)
    e.add_argument(
        "--out",
        default="runs/flower",
        help="run folder the ServerApp writes, relative to its working directory (default: runs/flower)",
    )
    e.add_argument("--nodes", type=int, default=1, help="SuperNodes the ServerApp waits for before round 1")
    e.add_argument(
        "--reply-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for replies in a round (0 = federation.client_timeout + 30 s, or 1 h)",
    )
    e.add_argument(
        "--client-states",
        default="",
        help="a folder on each node's file system for its clients' states, so that a resumed run finds "
        "them (default: none; the states then live in Flower's per-run context.state)",
    )
    e.add_argument("--name", default="sparsefl-app", help="the app's [project] name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from sparsefl.apps.flower.export import export_experiment
    from sparsefl.errors import ConfigError

    if args.flower_command != "export":  # pragma: no cover - argparse allows only known subcommands
        raise ConfigError("flower", args.flower_command, "export")
    if args.nodes < 1:
        raise ConfigError("--nodes", args.nodes, "an integer >= 1")
    if args.reply_timeout < 0:
        raise ConfigError("--reply-timeout", args.reply_timeout, "a number >= 0")
    cfg = load_config(args.config, args.overrides)
    check_output(args.dir, "DIR")
    try:
        root = export_experiment(
            args.dir,
            cfg,
            out=str(args.out),
            nodes=args.nodes,
            reply_timeout=args.reply_timeout,
            client_states=args.client_states,
            name=args.name,
        )
    except OSError as e:
        raise output_error("DIR", args.dir, e) from None
    console.print(f"wrote the Flower app for {cfg.method.name} on {cfg.data.name} to {root}")
    console.print(f"run it with:  flwr run {root} <superlink-connection> --stream", highlight=False)
    return 0
