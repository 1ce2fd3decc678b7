"""``sparsefl partition``: per-client label histogram of a partition, as a table and a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sparsefl.cli.main import add_config_arguments, check_output, output_error
from sparsefl.config import load_config


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("partition", help="show how a partition splits the labels among clients")
    add_config_arguments(p, "TOML file (its data and federation sections are used)")
    p.add_argument("--png", type=Path, default=Path("partition.png"), help="where to write the plot")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from sparsefl.data import load_dataset, make_partition
    from sparsefl.experiment.plots import plot_partition

    cfg = load_config(args.config, args.overrides)
    png = check_output(args.png, "--png", "file")
    data = load_dataset(cfg.data, cfg.seed)
    labels = data.y_train.numpy()
    split = make_partition(data, cfg.federation.num_clients, cfg.data, cfg.seed)
    hist = split.label_histogram(labels, data.num_classes)
    title = f"{cfg.data.name}, {cfg.data.partition}"
    if cfg.data.partition == "dirichlet":
        title += f" (alpha={cfg.data.alpha})"
    elif cfg.data.partition == "shards":
        title += f" ({cfg.data.shards_per_client} shards/client)"
    t = Table(title=title, header_style="bold")
    t.add_column("client", justify="right")
    for c in range(data.num_classes):
        t.add_column(str(c), justify="right")
    t.add_column("total", justify="right", style="bold")
    t.add_column("val", justify="right")
    for k, row in enumerate(hist):
        t.add_row(str(k), *[str(int(v)) if v else "." for v in row], str(int(row.sum())), str(len(split.val[k])))
    console.print(t)
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_partition(png, hist, title)
    except OSError as e:
        raise output_error("--png", png, e) from None
    console.print(f"wrote {png}")
    return 0
