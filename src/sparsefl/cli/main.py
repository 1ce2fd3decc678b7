"""``sparsefl``: run, list, show, partition, prune, bench, flower, export.

Each subcommand lives in its own module exposing ``register(subparsers)``. Errors a user can
cause (:class:`~sparsefl.errors.SparseflError`) print one line and exit with code 2; no
traceback. argparse is used rather than a decorator framework: it is in the standard library,
its error output is one line, and subcommand modules stay plain functions.

Tables never cut a cell: on a terminal a long cell folds onto a second line; off a terminal (a
pipe, a log file) every table prints as plain aligned text at its full width, for grep and awk.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Literal

from rich.console import Console, ConsoleOptions, ConsoleRenderable, RenderHook, RenderResult
from rich.markup import escape
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from sparsefl import __version__
from sparsefl.errors import ConfigError, SparseflError

#: Console width off a terminal: wide enough that no table is squeezed, so lines are never cut.
PLAIN_WIDTH = 100_000


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


def check_output(path: str | Path, flag: str, kind: Literal["folder", "file"] = "folder") -> Path:
    """``path`` as an output ``kind`` of option ``flag``, refused (ConfigError) before any work
    when it cannot be one: a folder that is an existing file, a file that is an existing folder,
    a parent that is a file, or a read-only location. Creates nothing."""
    p = Path(path)
    if p.exists():
        if kind == "folder" and not p.is_dir():
            raise ConfigError(flag, str(p), "a folder to write into (this path is an existing file)")
        if kind == "file" and p.is_dir():
            raise ConfigError(flag, str(p), "a file to write (this path is an existing folder)")
        target = p if kind == "folder" else p.absolute().parent
    else:
        target = p.absolute().parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise ConfigError(flag, str(p), f"a path whose folders can be created ({target} is a file)")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(flag, str(p), f"a writable location ({target} is not writable)")
    return p


def output_error(flag: str, path: str | Path, e: OSError) -> SparseflError:
    """The one-line error for an output that failed to be written (disk full, read-only)."""
    return SparseflError(f"{flag} {path}: cannot write there ({e.strerror or e})")


class _RightTrimmed:
    """A renderable's lines without trailing blanks (a plain table pads its last column)."""

    def __init__(self, renderable: ConsoleRenderable) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in console.render_lines(self.renderable, options, pad=False):
            while line and not line[-1].text.strip():
                line.pop()
            if line:
                line[-1] = Segment(line[-1].text.rstrip(), line[-1].style)
            yield from line
            yield Segment.line()


class FullCells(RenderHook):
    """Tables as printed: cells fold instead of ending in an ellipsis. Off a terminal (``plain``),
    or on one too narrow for the boxed table, a table drops its box and trailing blanks, and
    its title goes on a line of its own (a title wider than the table would otherwise wrap)."""

    def __init__(self, console: Console, plain: bool) -> None:
        self.console = console
        self.plain = plain

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        out: list[ConsoleRenderable] = []
        for r in renderables:
            if isinstance(r, Table) and r.box is not None:  # a grid (progress bars) is left alone
                for col in r.columns:
                    col.overflow = "fold"
                wide = Measurement.get(self.console, self.console.options.update_width(PLAIN_WIDTH), r).maximum
                if self.plain or wide > self.console.width:
                    if r.title:
                        out.append(Text(str(r.title)))
                        r.title = None
                    r.box, r.pad_edge, r.show_edge = None, False, False
                    r = _RightTrimmed(r)
            out.append(r)
        return out


def make_console() -> Console:
    """stdout's console: the terminal's width there; off a terminal, :data:`PLAIN_WIDTH`."""
    console = Console()
    plain = not console.is_terminal
    if plain:
        console = Console(width=PLAIN_WIDTH)
    console.push_render_hook(FullCells(console, plain))
    return console


SUBCOMMANDS = ("run", "list", "show", "partition", "prune", "bench", "flower", "export")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsefl", description="Sparse federated learning: prune, train sparsely, count honestly."
    )
    parser.add_argument("--version", action="version", version=f"sparsefl {__version__}")
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


def _one_line(message, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    """Warnings as the CLI's errors are: one line, no source location."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line
    console = make_console()
    err = Console(stderr=True)
    try:
        args = make_parser().parse_args(argv)
        return int(args.func(args, console) or 0)
    except SparseflError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted; the run folder holds the last complete round (rerun to resume)")
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
