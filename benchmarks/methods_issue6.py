"""Issue 6 comparisons on digits (30 rounds, 20 clients, 10 per round, Dirichlet alpha 0.5, cnn).

* Yu et al. dynamic pruning (``method.name=dynamic``, density 0.5) beside dense FedAvg: final
  accuracy, uplink bytes, training FLOPs and inference FLOPs per test sample (gated / dense).
* KD into a 95%-sparse static-mask student (``method.name=kd``, logit and feature) beside the
  same student without KD (same seeds); the teacher is the dense FedAvg run's final model.

Usage: ``python benchmarks/methods_issue6.py [OUT_DIR] [--rounds N]``; prints one table. All
ratios are measured in this one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.config import load_config
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.methods.dynamic import Dynamic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=None)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="issue6_"))
    must = [
        "federation.num_clients=20", "federation.clients_per_round=10", "data.alpha=0.5",
        f"federation.rounds={args.rounds}",
    ]  # fmt: skip
    teacher = out / "dense" / "model.safetensors"
    student = ["method.student.name=static_mask", "method.student.sparsity=0.95"]
    runs = {
        "dense": [],
        "dynamic_d0.5": ["method.name=dynamic", "method.density=0.5"],
        "static_mask_95": ["method.name=static_mask", "method.sparsity=0.95"],
        "kd_logit+static_mask_95": ["method.name=kd", "method.kd=logit", f"method.kd_teacher={teacher}", *student],
        "kd_feature+static_mask_95": ["method.name=kd", "method.kd=feature", f"method.kd_teacher={teacher}", *student],
    }
    rows = []
    for name, extra in runs.items():
        cfg = load_config(overrides=[*must, *extra])
        t0 = time.perf_counter()
        s = run_experiment(cfg, out / name, force=True)
        secs = time.perf_counter() - t0
        inf = ""
        if name.startswith("dynamic"):
            b = build(cfg)
            assert isinstance(b.method, Dynamic)
            eff, dense = b.method.inference_flops_per_sample(
                load_file(str(out / name / "model.safetensors")), b.data.x_test
            )
            inf = f"{eff:,.0f} / {dense:,.0f} = {eff / dense:.3f}"
        rows.append(
            (
                name,
                s["final_accuracy"],
                s["best_accuracy"],
                s["uplink_bytes_total"],
                s["train_flops_total"] / s["train_flops_dense_total"],
                inf,
                secs,
            )
        )
    base_up = rows[0][3]
    print(f"digits, {args.rounds} rounds, 20 clients / 10 per round, alpha 0.5, cnn (run folders: {out})")
    print(
        f"{'run':28s} {'final acc':>9s} {'best acc':>9s} {'uplink/dense':>12s} {'train FLOPs':>11s}  "
        f"{'inference FLOPs/sample (eff / dense)':36s} {'s':>6s}"
    )
    for name, acc, best, up, fl, inf, secs in rows:
        print(f"{name:28s} {acc:9.4f} {best:9.4f} {up / base_up:12.3f} {fl:11.3f}  {inf:36s} {secs:6.1f}")


if __name__ == "__main__":
    main()
