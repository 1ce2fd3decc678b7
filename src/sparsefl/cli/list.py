"""``sparsefl list``: what can be chosen (datasets, models, partitioners, methods, criteria, codecs, config keys)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from sparsefl.registry import CODECS, CRITERIA, DATASETS, METHODS, MODELS, PARTITIONERS

KINDS = {
    "datasets": DATASETS,
    "models": MODELS,
    "partitioners": PARTITIONERS,
    "methods": METHODS,
    "criteria": CRITERIA,
    "codecs": CODECS,
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("list", help="list datasets, models, partitioners, methods, criteria, codecs, keys")
    p.add_argument("what", nargs="?", choices=[*KINDS, "keys"], help="one kind only (default: all but keys)")
    p.add_argument("--method", metavar="NAME", help="with 'keys': only the options of this method")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    import sparsefl  # noqa: F401  (fills every registry)

    if args.what == "keys":
        from sparsefl.config import describe, describe_method

        t = Table(title="configuration keys (--set key=value)", header_style="bold")
        for col in ("key", "default", "meaning"):
            t.add_column(col)
        if args.method is None:
            for key, default, help_ in describe():
                t.add_row(key, default, help_)
        for name in [args.method] if args.method else METHODS.names():
            rows = describe_method(name)  # an unknown name: one line naming the valid ones
            t.add_section()
            t.add_row(f"method.name = {name!r}", "", METHODS.entry(name).summary)
            for key, default, help_ in rows:
                t.add_row(key, default, help_)
        console.print(t)
        return 0
    for kind in [args.what] if args.what else list(KINDS):
        reg = KINDS[kind]
        t = Table(title=f"{kind} ({reg.key})", header_style="bold", title_justify="left")
        t.add_column("name", style="cyan")
        t.add_column("description")
        for e in reg:
            t.add_row(e.name, e.summary)
        console.print(t)
    return 0
