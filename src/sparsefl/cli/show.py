"""``sparsefl show DIR [DIR ...]``: the summary of a finished or running run, or several side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparsefl.errors import RunFolderError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("show", help="summarise a finished or running run folder")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run folder; two or more are shown side by side")
    p.add_argument("--rounds", type=int, default=10, help="how many of the latest rounds to list (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from sparsefl.cli.run import summary_table
    from sparsefl.experiment.runfolder import RunFolder

    if len(args.dirs) > 1:
        from sparsefl.experiment.report import compare_runs

        console.print(compare_runs(args.dirs))
        return 0
    path = args.dirs[0]
    folder = RunFolder(path)
    cfg = folder.run_config()
    records = folder.read_metrics()
    summary = folder.read_summary()
    try:
        rounds, clients, model = cfg["federation"]["rounds"], cfg["federation"]["num_clients"], cfg["model"]["name"]
        if isinstance(cfg.get("_model"), dict):  # a user module
            model = cfg["_model"].get("class")
        what = f"{cfg['method']['name']} on {cfg['data']['name']} ({model}, {clients} clients, seed {cfg['seed']})"
    except (KeyError, TypeError):
        raise RunFolderError(f"{folder.path / 'config.json'} is not a run's configuration") from None
    state = "finished" if summary else f"running or interrupted ({len(records)}/{rounds} rounds)"
    console.print(f"[bold]{path}[/]: {what} - {state}")
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
