"""``sparsefl prune``: prune one model centrally and report where the weights went.

Loads any dataset a run takes (``--data``, or ``--config`` / ``--set data.*``, e.g. an npz),
builds a model, optionally trains it for a few SGD steps (before pruning with
``--prune-after-training``, else after pruning with the mask held fixed), prunes it with any
registered criterion, prints a per-layer density table and writes to ``--out``:

* ``mask.safetensors`` -- the mask (:meth:`sparsefl.masks.Mask.save`); a run starts from it
  with ``method.name=static_mask`` and ``method.mask_file=<out>/mask.safetensors``;
* ``model.safetensors`` -- the pruned (and trained) model's state_dict;
* ``layer_density.png`` -- a bar chart of the density of each pruned layer;
* ``prune.json`` -- criterion, target sparsity, realised density, per-layer densities and the
  test accuracy of the final (masked) model.

Criterion options are passed as ``--opt key=value`` (the value is read as TOML, e.g.
``--opt iterations=10 --opt input_shape=[1,8,8]``).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save
from torch import nn

from sparsefl.cli.main import add_config_arguments, check_output, output_error
from sparsefl.config import LocalConfig, load_config, parse_override, to_dict
from sparsefl.data import Dataset, load_dataset
from sparsefl.errors import ConfigError
from sparsefl.masks import Mask
from sparsefl.models import build_model
from sparsefl.pruning import prune
from sparsefl.registry import CRITERIA, DATASETS, MODELS
from sparsefl.rng import torch_gen
from sparsefl.runtime.sgd import SGD
from sparsefl.state import atomic_write_bytes, atomic_write_text

#: Samples in the batch that data-dependent criteria score on.
SCORE_BATCH = 256


def register(sub: Any) -> None:
    """Add the ``prune`` subcommand to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "prune",
        help="prune a model once and report per-layer densities",
        description="Prune a model centrally with any registered criterion; write the mask, a "
        "per-layer density chart and prune.json to --out.",
    )
    add_config_arguments(p, "experiment TOML file (its seed, data and model sections are used)")
    p.add_argument("--model", help="model name (default: model.name of the configuration, cnn)")
    p.add_argument("--data", help="dataset name (default: data.name of the configuration, digits)")
    p.add_argument("--criterion", default="global_magnitude", help="pruning criterion (sparsefl list)")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of prunable weights removed")
    p.add_argument("--train-steps", type=int, default=0, help="central SGD steps (default: 0)")
    p.add_argument(
        "--prune-after-training",
        action="store_true",
        help="train first, then prune (default: prune at initialisation, then train with the mask)",
    )
    p.add_argument("--seed", type=int, help="seed of every random draw (default: seed of the configuration, 0)")
    p.add_argument("--keep-first", action="store_true", help="keep the first layer dense")
    p.add_argument("--keep-last", action="store_true", help="keep the last layer (classifier) dense")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="a criterion option (repeatable)")
    p.add_argument("--out", required=True, help="output folder (mask.safetensors, model.safetensors, prune.json)")
    p.set_defaults(func=run)


def _train(model: nn.Module, ds: Dataset, steps: int, seed: int, mask: Mask | None, purpose: str) -> None:
    """``steps`` SGD steps on the training split (LocalConfig defaults); the mask, if any, is
    re-applied after every step so removed weights stay zero."""
    cfg = LocalConfig()
    opt = SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch_gen(seed, "cli-prune", purpose)
    n = len(ds.x_train)
    model.train()
    for _ in range(steps):
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mask is not None:
            mask.apply_to_model_(model)


@torch.no_grad()
def _accuracy(model: nn.Module, ds: Dataset) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(ds.x_test), 512):
        pred = model(ds.x_test[i : i + 512]).argmax(dim=1)
        correct += int((pred == ds.y_test[i : i + 512]).sum())
    return correct / len(ds.x_test)


def _plot(path: Path, names: list[str], densities: list[float], overall: float, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), densities, color="tab:blue")
    ax.axhline(overall, color="tab:red", linestyle="--", linewidth=1, label=f"global {overall:.4f}")
    ax.legend(loc="upper right")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("density (fraction of weights kept)")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def _options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``sparsefl prune``; return the exit code (errors raise SparseflError)."""
    if args.train_steps < 0:
        raise ConfigError("--train-steps", args.train_steps, "an integer >= 0")
    # --model, --data and --seed are shorthands for --set model.name, data.name and seed
    overrides = list(getattr(args, "overrides", []) or [])
    for flag, registry, value, key in (
        ("--criterion", CRITERIA, args.criterion, None),
        ("--model", MODELS, args.model, "model.name"),
        ("--data", DATASETS, args.data, "data.name"),
    ):  # unknown names fail before any work, in the words of the command line
        if value is not None and value not in registry:
            raise ConfigError(flag, value, "one of: " + ", ".join(registry.names()))
        if value is not None and key is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(getattr(args, "config", None), overrides)
    out = check_output(args.out, "--out")
    options = _options(list(getattr(args, "opt", []) or []))
    if args.keep_first:
        options["keep_first"] = True
    if args.keep_last:
        options["keep_last"] = True
    seed = cfg.seed
    ds = load_dataset(cfg.data, seed)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, seed)

    dense_accuracy = None
    if args.prune_after_training and args.train_steps:
        _train(model, ds, args.train_steps, seed, None, "train")
        dense_accuracy = _accuracy(model, ds)

    perm = torch.randperm(len(ds.x_train), generator=torch_gen(seed, "cli-prune", "score-batch"))
    idx = perm[:SCORE_BATCH]
    mask = prune(
        model,
        args.criterion,
        args.sparsity,
        data=(ds.x_train[idx], ds.y_train[idx]),
        seed=seed,
        **options,
    )
    mask.apply_to_model_(model)
    if not args.prune_after_training and args.train_steps:
        _train(model, ds, args.train_steps, seed, mask, "train")
    accuracy = _accuracy(model, ds)

    state = model.state_dict()
    table = Table(title=f"{args.criterion} on {cfg.model.name}/{cfg.data.name}, target sparsity {args.sparsity:g}")
    table.add_column("layer")
    table.add_column("shape")
    table.add_column("kept", justify="right")
    table.add_column("density", justify="right")
    layers: dict[str, dict[str, Any]] = {}
    for name, m in mask.items():
        kept = int(m.sum())
        dens = kept / m.numel() if m.numel() else 1.0
        layers[name] = {"shape": list(state[name].shape), "kept": kept, "numel": m.numel(), "density": dens}
        table.add_row(name, "x".join(map(str, state[name].shape)), f"{kept}/{m.numel()}", f"{dens:.4f}")
    density = mask.density()
    table.add_section()
    table.add_row("global", "", f"{mask.num_kept()}/{mask.numel()}", f"{density:.4f}")
    console.print(table)
    console.print(f"test accuracy: {accuracy:.4f}")

    try:
        out.mkdir(parents=True, exist_ok=True)
        mask.save(out / "mask.safetensors")
        atomic_write_bytes(out / "model.safetensors", save({k: v.contiguous() for k, v in state.items()}))
        _plot(
            out / "layer_density.png",
            list(layers),
            [v["density"] for v in layers.values()],
            density,
            f"{args.criterion}, sparsity {args.sparsity:g} (global density {density:.4f})",
        )
    except OSError as e:
        raise output_error("--out", out, e) from None
    report = {
        "criterion": args.criterion,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "data_config": to_dict(cfg.data),
        "seed": seed,
        "sparsity": args.sparsity,
        "density": density,
        "realised_sparsity": 1.0 - density,
        "kept": mask.num_kept(),
        "numel": mask.numel(),
        "layers": layers,
        "options": {k: v for k, v in options.items()},
        "train_steps": args.train_steps,
        "prune_after_training": bool(args.prune_after_training),
        "dense_test_accuracy": dense_accuracy,
        "test_accuracy": accuracy,
    }
    try:
        atomic_write_text(out / "prune.json", json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise output_error("--out", out, e) from None
    console.print(f"wrote mask.safetensors, model.safetensors, layer_density.png and prune.json to {out}")
    return 0
