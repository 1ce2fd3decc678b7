"""Static-mask FedAvg at 98% sparsity: SynFlow, ProsPr and Global MP against random pruning.

Digits with the foundation's CNN, 20 clients, 10 per round, Dirichlet alpha 0.5, 30 rounds (the
default config), the mask chosen on the server at initialisation (``score_source=server``, the
256-sample proxy batch for ProsPr) and fixed for training. Every criterion runs with the same
seeds and the same budget (rounds, local epochs, learning rate); dense FedAvg is shown for
reference. Prints one row per (criterion, seed) and a summary of the mean final accuracy per
criterion with its margin over random; exits 1 if a criterion does not beat random on average.

Run ``python benchmarks/static_mask_98.py`` (about 5 minutes on 2 busy cores), or with
``--seeds 0 1 2 --rounds 30 --out /tmp/sm98``. ``tests/methods/test_static_mask.py`` runs it
under ``@pytest.mark.slow``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.config import load_config
from sparsefl.experiment.runner import run_experiment

CRITERIA = ("synflow", "prospr", "global_magnitude", "random")
SPARSITY = 0.98


def run_one(criterion: str | None, seed: int, rounds: int, out: Path) -> dict[str, Any]:
    """One run; ``criterion=None`` is dense FedAvg."""
    base = [
        f"seed={seed}",
        "data.name=digits",
        "model.name=cnn",
        "federation.num_clients=20",
        "federation.clients_per_round=10",
        "data.alpha=0.5",
        f"federation.rounds={rounds}",
    ]
    if criterion is None:
        cfg = load_config(overrides=[*base, "method.name=fedavg"])
        name = f"fedavg_s{seed}"
    else:
        cfg = load_config(
            overrides=[*base, "method.name=static_mask", f"method.sparsity={SPARSITY}", f"method.criterion={criterion}"]
        )
        name = f"{criterion}_s{seed}"
    t0 = time.perf_counter()
    summary = run_experiment(cfg, out / name, force=True)
    return {**summary, "criterion": criterion or "dense fedavg", "seed": seed, "seconds": time.perf_counter() - t0}


def run_all(seeds: list[int], rounds: int, out: Path) -> list[dict[str, Any]]:
    """Every criterion (and dense FedAvg) for every seed."""
    rows = []
    for seed in seeds:
        for crit in (*CRITERIA, None):
            rows.append(run_one(crit, seed, rounds, out))
    return rows


def mean_final(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean final accuracy per criterion over the seeds."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["criterion"], []).append(float(r["final_accuracy"]))
    return {k: statistics.fmean(v) for k, v in by.items()}


def table(rows: list[dict[str, Any]]) -> str:
    """The per-run table and the per-criterion summary, as text."""
    dense_up = {r["seed"]: r["uplink_bytes_total"] for r in rows if r["criterion"] == "dense fedavg"}
    lines = [
        f"{'criterion':<18}{'seed':>5}{'final acc':>11}{'best acc':>10}{'density':>10}{'uplink/dense':>14}{'s':>7}",
    ]
    for r in rows:
        ratio = r["uplink_bytes_total"] / dense_up[r["seed"]] if r["seed"] in dense_up else float("nan")
        lines.append(
            f"{r['criterion']:<18}{r['seed']:>5}{r['final_accuracy']:>11.4f}{r['best_accuracy']:>10.4f}"
            f"{r['density']:>10.4f}{ratio:>14.4f}{r['seconds']:>7.1f}"
        )
    means = mean_final(rows)
    lines.append("")
    lines.append(f"{'criterion':<18}{'mean final acc':>16}{'minus random':>14}{'beats random':>14}")
    for crit, acc in means.items():
        margin = acc - means["random"]
        beats = "-" if crit in ("random", "dense fedavg") else ("yes" if margin > 0 else "NO")
        lines.append(f"{crit:<18}{acc:>16.4f}{margin:>14.4f}{beats:>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of this process")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_all(args.seeds, args.rounds, args.out or Path(tmp))
    print(
        f"static_mask at sparsity {SPARSITY}: digits/cnn, 20 clients, 10 per round, alpha 0.5, "
        f"{args.rounds} rounds, seeds {args.seeds}"
    )
    print(table(rows))
    means = mean_final(rows)
    losers = [c for c in CRITERIA if c != "random" and means[c] <= means["random"]]
    if losers:
        print("does not beat random: " + ", ".join(losers))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
