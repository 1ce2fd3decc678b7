"""``sparsefl export DIR --format safetensors|onnx --out FILE``: a finished run's model for other tools."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="write a finished run's model as sparse safetensors or ONNX",
        description="Write a finished run's trained model for use outside sparsefl (layouts: docs/run-folder.md).",
    )
    p.add_argument("dir", type=Path, help="run folder of a finished run")
    p.add_argument(
        "--format",
        choices=("safetensors", "onnx"),
        required=True,
        help="safetensors: masked weights stored sparse, plus the input normalisation; "
        "onnx: the input normalisation and the model as one graph (needs the 'export' extra)",
    )
    p.add_argument("--out", type=Path, required=True, help="file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from sparsefl.experiment.artifacts import export_onnx, export_safetensors, load_run

    if args.format == "safetensors":
        export_safetensors(args.dir, args.out)
    else:
        export_onnx(load_run(args.dir), args.out)
    console.print(f"{args.out}: {args.format} export of {args.dir}", highlight=False)
    return 0
