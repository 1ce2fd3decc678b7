"""``sparsefl``: run, list, show, partition, prune.

Each subcommand lives in its own module exposing ``register(subparsers)``. Errors a user can
cause (:class:`~sparsefl.errors.SparseflError`) print one line and exit with code 2; no
traceback. argparse is used rather than a decorator framework: it is in the standard library,
its error output is one line, and subcommand modules stay plain functions.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from rich.console import Console

from sparsefl.errors import SparseflError


def add_config_arguments(p: argparse.ArgumentParser, config_help: str = "experiment TOML file") -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE``: how every command takes a configuration."""
    p.add_argument("--config", type=Path, help=config_help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. --set federation.rounds=10 (repeatable)",
    )


SUBCOMMANDS = ("run", "list", "show", "partition", "prune", "bench", "flower")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsefl", description="Sparse federated learning: prune, train sparsely, count honestly."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"sparsefl.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"sparsefl.cli.{name}":
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=False)
    err = Console(stderr=True)
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args, console) or 0)
    except SparseflError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted; the run folder holds the last complete round (rerun to resume)")
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
