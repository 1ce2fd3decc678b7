"""``sparsefl run``: one experiment, with a live progress bar and a closing summary table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparsefl.cli.main import add_config_arguments
from sparsefl.config import load_config
from sparsefl.errors import RunFolderError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run one experiment", description="Run one federated experiment.")
    add_config_arguments(p, "TOML file (sections: data, model, federation, local, method, comm)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/<method>-<config hash>)")
    p.add_argument("--force", action="store_true", help="rerun even if the folder holds a finished run")
    p.add_argument(
        "--device",
        metavar="DEVICE",
        help="auto (default: the first CUDA device if torch sees one, else the CPU), cpu, cuda or cuda:N "
        "(the same as --set device=DEVICE)",
    )
    p.set_defaults(func=run)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace, console: Console) -> int:
    from sparsefl.apps import run as run_experiment
    from sparsefl.config import config_hash

    overrides = list(args.overrides)
    if args.device is not None:  # a TOML string, so that any text reaches the config's check
        overrides.append(f"device={json.dumps(args.device)}")
    cfg = load_config(args.config, overrides)
    out = args.out or Path("runs") / f"{cfg.method.name}-{config_hash(cfg)[:10]}"
    sent = {"up": 0, "down": 0}
    with Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("rounds", total=cfg.federation.rounds, info="")

        def progress(record, meta):  # type: ignore[no-untyped-def]
            sent["up"] += record.uplink_bytes
            sent["down"] += record.downlink_bytes
            acc = "-" if record.accuracy is None else f"{record.accuracy:.4f}"
            fails = f" failures {len(record.failures)}" if record.failures else ""
            bar.update(
                task, completed=record.round, info=f"acc {acc}  up {_mb(sent['up'])}  down {_mb(sent['down'])}{fails}"
            )

        try:
            summary = run_experiment(
                cfg, out, force=args.force, progress=progress, log=lambda msg: console.print(f"[yellow]{msg}[/]")
            )
        except OSError as e:  # the file system refused a write (no space left, read-only, ...)
            _hide_if_idle(bar, task)
            raise RunFolderError(f"{e.filename or f'run folder {out}'}: {e.strerror or e}") from None
        except BaseException:
            _hide_if_idle(bar, task)  # an error before round 1 is the one line the user sees
            raise
    if summary.get("status") == "finished":
        console.print(f"[yellow]{out} already holds this finished run (use --force to rerun)[/]")
    console.print(summary_table(summary, f"sparsefl run: {cfg.method.name} on {cfg.data.name} -> {out}"))
    return 0


def _hide_if_idle(bar: Progress, task: TaskID) -> None:
    """Hide the progress bar of a run that ended before its first round."""
    if not bar.tasks[0].completed:
        bar.update(task, visible=False)
        bar.live.transient = True


def summary_table(summary: dict, title: str) -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    fmt = {
        "final_accuracy": lambda v: f"{v:.4f}",
        "best_accuracy": lambda v: f"{v:.4f}",
        "density": lambda v: f"{v:.4f}",
        "uplink_bytes_total": _mb,
        "downlink_bytes_total": _mb,
        "train_flops_total": lambda v: f"{v / 1e9:.3f} GFLOP",
        "train_flops_dense_total": lambda v: f"{v / 1e9:.3f} GFLOP",
        "client_seconds_total": lambda v: f"{v:.1f} s",
        "wall_seconds": lambda v: f"{v:.1f} s",
        "model_sha256": lambda v: v[:16] + "...",
    }
    for k in (
        "final_accuracy",
        "best_accuracy",
        "rounds",
        "num_params",
        "density",
        "uplink_bytes_total",
        "downlink_bytes_total",
        "train_flops_total",
        "train_flops_dense_total",
        "client_seconds_total",
        "wall_seconds",
        "failures_total",
        "model_sha256",
    ):
        if k in summary and summary[k] is not None:
            t.add_row(k, fmt.get(k, str)(summary[k]))
    return t
