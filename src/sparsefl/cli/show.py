"""``sparsefl show DIR``: the summary of a finished or running run."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparsefl.errors import RunFolderError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("show", help="summarise a finished or running run folder")
    p.add_argument("dir", type=Path, help="run folder")
    p.add_argument("--rounds", type=int, default=10, help="how many of the latest rounds to list (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from sparsefl.cli.run import summary_table
    from sparsefl.experiment.runfolder import RunFolder

    folder = RunFolder(args.dir)
    cfg = folder.read_config()
    if cfg is None:
        raise RunFolderError(f"{args.dir} is not a run folder (no config.json)")
    records = folder.read_metrics()
    summary = folder.read_summary()
    state = "finished" if summary else f"running or interrupted ({len(records)}/{cfg['federation']['rounds']} rounds)"
    console.print(
        f"[bold]{args.dir}[/]: {cfg['method']['name']} on {cfg['data']['name']} "
        f"({cfg['model']['name']}, {cfg['federation']['num_clients']} clients, seed {cfg['seed']}) - {state}"
    )
    t = Table(header_style="bold")
    for col in ("round", "accuracy", "loss", "uplink MB", "downlink MB", "train GFLOP", "client s", "failures"):
        t.add_column(col, justify="right")
    for r in records[-args.rounds :]:
        t.add_row(
            str(r["round"]),
            "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}",
            "-" if r["loss"] is None else f"{r['loss']:.4f}",
            f"{r['uplink_bytes'] / 1e6:.3f}",
            f"{r['downlink_bytes'] / 1e6:.3f}",
            f"{r['train_flops'] / 1e9:.3f}",
            f"{r['client_seconds']:.2f}",
            str(len(r["failures"])),
        )
    console.print(t)
    if summary:
        console.print(summary_table(summary, "summary"))
    return 0
