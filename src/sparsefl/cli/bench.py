"""``sparsefl bench``: a matrix of experiments in one command, one table and one report."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite (methods x sparsity x partitions x seeds) and write a report",
        description="Run a suite; finished runs are skipped and interrupted ones resumed.",
    )
    p.add_argument("--suite", required=True, help="a built-in suite (quick, paper, dst, kd) or a suite TOML file")
    p.add_argument("--out", type=Path, required=True, help="output folder (results.csv, report.md/html, runs/)")
    p.add_argument("--jobs", type=int, default=1, help="experiments run in parallel processes (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from sparsefl.cli.main import check_output
    from sparsefl.errors import ConfigError
    from sparsefl.experiment.bench import load_suite, run_suite
    from sparsefl.experiment.report import summary_table

    if args.jobs < 1:
        raise ConfigError("--jobs", args.jobs, "an integer >= 1")
    check_output(args.out, "--out")
    suite = load_suite(args.suite)
    sweeps, total = len(suite.sweep_plan()), len(suite.plan()) + len(suite.sweep_plan())
    tuned = f" ({sweeps} of them tuning sweeps)" if sweeps else ""
    console.print(f"suite [bold]{suite.name}[/]: {total} runs{tuned}, {args.jobs} at a time -> {args.out}")
    with Progress(
        TextColumn("[bold]runs"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(), console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task("bench", total=total, last="")

        def done(run, summary):  # type: ignore[no-untyped-def]
            acc = summary.get("final_accuracy")
            tag = "error" if "error" in summary else (summary.get("status") or "")
            name = f"{run.subdir}/{run.folder_name}"
            last = f"{name}: {tag} acc={acc:.4f}" if acc is not None else f"{name}: {tag}"
            bar.update(task, advance=1, last=last)
            if not console.is_terminal:  # a log file gets one line per finished run instead of a bar
                finished = int(bar.tasks[0].completed)
                console.print(f"[{finished}/{total}] {last} ({bar.tasks[0].elapsed or 0:.0f} s elapsed)")
            for w in summary.get("warnings") or []:  # a run that did not learn is never silent
                console.print(f"[yellow]warning: {name}: {w}[/]")

        rows = run_suite(suite, args.out, jobs=args.jobs, on_done=done)
    from rich.table import Table

    head, table = summary_table(rows)
    t = Table(title=f"{suite.name}: mean ± std over seeds", header_style="bold")
    for h in head:
        t.add_column(h)
    for r in table:
        t.add_row(*r)
    console.print(t)
    failed = (Path(args.out) / "failed.txt").read_text().strip()
    if failed:
        console.print(f"[red]failed runs:[/]\n{failed}")
    tuning = " (and sweeps.csv, tuning.json)" if sweeps else ""
    console.print(f"wrote {args.out}/results.csv, report.md, report.html{tuning}")
    return 1 if failed else 0
