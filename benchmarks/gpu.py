"""sparsefl on an accelerator: every ratio measured in one run, on one device.

Usage::

    python benchmarks/gpu.py [--quick] [--json FILE] [--device DEVICE] [--fmnist-dir DIR]

Sections (each a markdown table on stdout; the JSON holds the same rows):

* ``vs_plain``: one sparsefl round (the sequential executor: decode, hooks, the one local loop,
  encode, aggregate) against a plain PyTorch FedAvg round written here (per client a copy of the
  global model, SGD with momentum 0.9, then the sample-weighted mean), on the same model, data,
  clients and steps: cnn, resnet20 and resnet18 on 3x32x32 inputs. ``ratio`` = sparsefl seconds
  / plain seconds (1.0 = no overhead).
* ``batched``: the batched executor against the sequential one at 10 and 100 clients per round
  (cnn, resnet8, resnet20) and at 1,000 for the cnn; ``speedup`` = sequential / batched seconds.
  A row says why it was skipped when the method cannot run batched.
* every row carries the peak device memory each variant's round adds over what was resident
  before it (``torch.cuda.max_memory_allocated`` less ``memory_allocated``, reset before each;
  the variants' own data and models stay resident throughout; ``n/a`` on the CPU).
* ``fmnist``: a Fashion-MNIST-shaped run end to end (``sparsefl.run``: 100 clients, 10 per
  round, resnet20, 60,000 28x28x1 training images; the real set from ``--fmnist-dir``, else
  seeded random images of that size): seconds per round (rounds after the first) and the
  projected time of 500 rounds.
* ``determinism``: the default experiment run twice on the device (30 rounds; 3 with
  ``--quick``): whether both give the same ``model_sha256``.

Round times are medians over the timed rounds (the first round of each variant is a warm-up);
the variants of a row alternate round by round. ``--quick`` runs every section with tiny sizes
on the CPU in well under a minute (what the test suite runs); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import sparsefl  # noqa: E402
from sparsefl.config import load_config  # noqa: E402
from sparsefl.data.datasets import Dataset  # noqa: E402
from sparsefl.engines.embedded import EmbeddedEngine  # noqa: E402
from sparsefl.experiment.runner import build  # noqa: E402
from sparsefl.rng import torch_gen  # noqa: E402
from sparsefl.runtime.batched import unsupported_reason  # noqa: E402
from sparsefl.runtime.client import iter_batches  # noqa: E402
from sparsefl.runtime.device import device_name, prepare_device, resolve_device  # noqa: E402
from sparsefl.runtime.server import Server  # noqa: E402
from sparsefl.state import clone_state  # noqa: E402

#: Sizes of a full run and of ``--quick``.
FULL = {
    "shape": (3, 32, 32),
    "train": 50_000,
    "width": 1.0,
    "steps": 10,
    "rounds": 4,
    "vs_plain": ("cnn", "resnet20", "resnet18"),
    "plain_clients": (100, 10),
    "batched": (("cnn", (10, 100, 1000)), ("resnet8", (10, 100)), ("resnet20", (10, 100))),
    "fmnist": {"clients": 100, "per_round": 10, "train": 60_000, "rounds": 4, "width": 1.0},
}
QUICK = {
    "shape": (3, 8, 8),
    "train": 480,
    "width": 0.25,
    "steps": 2,
    "rounds": 2,
    "vs_plain": ("cnn", "resnet20", "resnet18"),
    "plain_clients": (8, 3),
    "batched": (("cnn", (2, 4)), ("resnet8", (2,)), ("resnet20", (2,))),
    "fmnist": {"clients": 8, "per_round": 3, "train": 400, "rounds": 2, "width": 0.25},
}


def synthetic(shape: tuple[int, ...], n_train: int, seed: int = 0) -> Dataset:
    """Seeded standard-normal images with random labels (10 classes): timing needs shapes, not skill."""
    g = torch.Generator().manual_seed(seed)
    n_test = max(64, n_train // 10)
    return Dataset(
        "bench",
        torch.randn(n_train, *shape, generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randn(n_test, *shape, generator=g),
        torch.randint(0, 10, (n_test,), generator=g),
        10,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak_mb(device: torch.device, base: int) -> float | None:
    """Peak device MiB above ``base`` (what was resident before: the other variant's data)."""
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float | None]:
    """(seconds, peak device MiB that ``fn()`` added over what was resident) of ``fn()``."""
    sync(device)
    peak_reset(device)
    base = allocated(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t, peak_mb(device, base)


class Federation:
    """sparsefl's server loop over a synthetic dataset, one round per :meth:`round`."""

    def __init__(
        self, model: str, data: Dataset, clients: int, per_round: int, sizes: dict, device: str, executor: str
    ):
        cfg = load_config(
            overrides=[
                f"model.name='{model}'",
                f"model.width={sizes['width']}",
                "data.partition='iid'",
                f"federation.num_clients={clients}",
                f"federation.clients_per_round={per_round}",
                "federation.rounds=1000000",
                f"local.steps={sizes['steps']}",
                "local.batch_size=32",
                f"device='{device}'",
                f"federation.executor='{executor}'",
            ]
        )
        self.b = build(cfg, data=data)
        self.device = resolve_device(cfg.device)
        engine = EmbeddedEngine(
            self.b.method, data.x_train, data.y_train, self.b.split, 1, device=cfg.device, executor=executor
        )
        self.server = Server(cfg, self.b.method, engine, data.x_test, data.y_test, device=self.device)
        self.state = self.b.method.init_state(clone_state(self.b.spec.build().state_dict()))
        self.rnd = 0

    def round(self) -> None:
        self.rnd += 1
        self.state, record = self.server.train_round(self.state, self.rnd)
        if record.failures:
            raise RuntimeError(f"a client failed: {record.failures[0]['reason']}")


class PlainFedAvg:
    """FedAvg written directly in PyTorch: the reference a framework's round is compared with."""

    def __init__(self, fed: Federation, data: Dataset):
        self.device = fed.device
        self.model = fed.b.spec.build().to(self.device)
        self.x, self.y = data.x_train.to(self.device), data.y_train.to(self.device)
        self.split, self.cfg = fed.b.split, fed.b.cfg
        self.rnd = 0

    def round(self) -> None:
        self.rnd += 1
        cfg = self.cfg
        gen = torch_gen(0, "plain", self.rnd)
        clients = torch.randperm(cfg.federation.num_clients, generator=gen)[: cfg.federation.clients_per_round]
        states, weights = [], []
        for cid in clients.tolist():
            rows = torch.from_numpy(self.split.train[cid]).to(self.device)
            x, y = self.x[rows], self.y[rows]
            local = copy.deepcopy(self.model)
            local.train()
            opt = torch.optim.SGD(
                local.parameters(), lr=cfg.local.lr, momentum=0.9, weight_decay=cfg.local.weight_decay
            )
            step = 0
            while step < cfg.local.steps:
                for idx in iter_batches(len(x), cfg.local.batch_size, gen):
                    b = idx.to(self.device)
                    loss = F.cross_entropy(local(x[b]), y[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    if step >= cfg.local.steps:
                        break
            states.append(local.state_dict())
            weights.append(len(x))
        total = sum(weights)
        avg = {}
        for k, v in states[0].items():
            if v.is_floating_point():
                avg[k] = sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))
            else:
                avg[k] = v
        self.model.load_state_dict(avg)


def compare(variants: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, dict]:
    """Each variant's median round seconds and peak memory; the variants alternate round by round
    after one warm-up round each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float | None] = dict.fromkeys(variants)
    for _ in range(max(1, rounds - 1)):
        for name, fn in variants.items():
            s, p = timed(fn, device)
            times[name].append(s)
            if p is not None:
                peaks[name] = max(p, peaks[name] or 0.0)
    return {k: {"seconds": statistics.median(v), "peak_mb": peaks[k]} for k, v in times.items()}


def section_vs_plain(sizes: dict, device_opt: str) -> list[dict]:
    data = synthetic(sizes["shape"], sizes["train"])
    clients, per_round = sizes["plain_clients"]
    rows = []
    for model in sizes["vs_plain"]:
        fed = Federation(model, data, clients, per_round, sizes, device_opt, "sequential")
        plain = PlainFedAvg(fed, data)
        r = compare({"sparsefl": fed.round, "plain": plain.round}, sizes["rounds"], fed.device)
        rows.append(
            {
                "model": model,
                "clients_per_round": per_round,
                "steps_per_client": sizes["steps"],
                "sparsefl_round_s": r["sparsefl"]["seconds"],
                "plain_round_s": r["plain"]["seconds"],
                "ratio": r["sparsefl"]["seconds"] / r["plain"]["seconds"],
                "sparsefl_peak_mb": r["sparsefl"]["peak_mb"],
                "plain_peak_mb": r["plain"]["peak_mb"],
            }
        )
    return rows


def section_batched(sizes: dict, device_opt: str) -> list[dict]:
    data = synthetic(sizes["shape"], sizes["train"])
    rows: list[dict] = []
    for model, per_rounds in sizes["batched"]:
        for per_round in per_rounds:
            row: dict[str, Any] = {"model": model, "clients_per_round": per_round}
            rows.append(row)
            clients = max(per_round, sizes["plain_clients"][0])
            seq = Federation(model, data, clients, per_round, sizes, device_opt, "sequential")
            reason = unsupported_reason(seq.b.method)
            if reason is not None:
                row["skipped"] = reason
                continue
            bat = Federation(model, data, clients, per_round, sizes, device_opt, "batched")
            r = compare({"sequential": seq.round, "batched": bat.round}, sizes["rounds"], seq.device)
            row.update(
                sequential_round_s=r["sequential"]["seconds"],
                batched_round_s=r["batched"]["seconds"],
                speedup=r["sequential"]["seconds"] / r["batched"]["seconds"],
                sequential_peak_mb=r["sequential"]["peak_mb"],
                batched_peak_mb=r["batched"]["peak_mb"],
            )
    return rows


def section_determinism(device_opt: str, rounds: int, workdir: Path) -> dict:
    """The default experiment (digits, cnn, fedavg) run twice on the device: the same
    ``model_sha256`` both times is what the deterministic kernels promise."""
    shas = []
    for i in range(2):
        cfg = load_config(overrides=[f"federation.rounds={rounds}", f"device='{device_opt}'"])
        shas.append(sparsefl.run(cfg, workdir / f"twice-{i}")["model_sha256"])
    return {"rounds": rounds, "sha_first": shas[0], "sha_second": shas[1], "same": shas[0] == shas[1]}


def section_fmnist(sizes: dict, device_opt: str, fmnist_dir: str | None, workdir: Path) -> dict:
    f = sizes["fmnist"]
    if fmnist_dir:
        data = ["data.name='fashion-mnist'", f"data.dir='{fmnist_dir}'"]
        source = f"Fashion-MNIST from {fmnist_dir}"
    else:
        rng = np.random.default_rng(0)
        path = workdir / "fmnist-shaped.npz"
        n_test = max(100, f["train"] // 6)
        np.savez(
            path,
            x_train=rng.integers(0, 256, (f["train"], 1, 28, 28), dtype=np.uint8),
            y_train=np.arange(f["train"]) % 10,
            x_test=rng.integers(0, 256, (n_test, 1, 28, 28), dtype=np.uint8),
            y_test=np.arange(n_test) % 10,
        )
        data = ["data.name='npz'", f"data.dir='{path}'"]
        source = f"random 28x28x1 images ({f['train']} for training)"
    cfg = load_config(
        overrides=[
            *data,
            "model.name='resnet20'",
            f"model.width={f['width']}",
            f"federation.num_clients={f['clients']}",
            f"federation.clients_per_round={f['per_round']}",
            f"federation.rounds={f['rounds']}",
            f"device='{device_opt}'",
        ]
    )
    device = resolve_device(cfg.device)
    peak_reset(device)
    base = allocated(device)
    t = time.perf_counter()
    summary = sparsefl.run(cfg, workdir / "fmnist-run")
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in (workdir / "fmnist-run" / "metrics.jsonl").read_text().splitlines()]
    per_round = statistics.median(r["round_seconds"] + r["eval_seconds"] for r in records[1:] or records)
    return {
        "data": source,
        "model": "resnet20",
        "clients": f["clients"],
        "clients_per_round": f["per_round"],
        "rounds": len(records),
        "executor": summary["executor"],
        "wall_s": wall,
        "seconds_per_round": per_round,
        "projected_500_rounds_s": 500 * per_round,
        "peak_mb": peak_mb(device, base),
    }


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "skipped" in r:
            lines.append(
                "| " + " | ".join([_cell(r.get(cols[0])), _cell(r.get(cols[1])), f"skipped: {r['skipped']}"]) + " |"
            )
        else:
            lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (a smoke test; figures mean nothing)")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto; cpu with --quick)")
    p.add_argument("--fmnist-dir", help="folder of the Fashion-MNIST IDX files (default: random images of its size)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    device_opt = args.device or ("cpu" if args.quick else "auto")
    torch.set_num_threads(1)
    device = resolve_device(device_opt)
    prepare_device(device)
    out: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "quick": args.quick,
    }
    quick = " (--quick)" if args.quick else ""
    print(f"# sparsefl on {device} ({out['device_name']}), torch {torch.__version__}{quick}\n")
    out["vs_plain"] = section_vs_plain(sizes, device_opt)
    print("## sparsefl round vs a plain PyTorch FedAvg round (ratio = sparsefl / plain)\n")
    print(
        table(
            out["vs_plain"],
            [
                "model",
                "clients_per_round",
                "sparsefl_round_s",
                "plain_round_s",
                "ratio",
                "sparsefl_peak_mb",
                "plain_peak_mb",
            ],
        )
    )
    out["batched"] = section_batched(sizes, device_opt)
    print("\n## batched vs sequential executor (speedup = sequential / batched)\n")
    print(
        table(
            out["batched"],
            [
                "model",
                "clients_per_round",
                "sequential_round_s",
                "batched_round_s",
                "speedup",
                "sequential_peak_mb",
                "batched_peak_mb",
            ],
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        out["fmnist"] = section_fmnist(sizes, device_opt, args.fmnist_dir, Path(tmp))
    print("\n## Fashion-MNIST-shaped run, end to end\n")
    print(
        table(
            [out["fmnist"]],
            [
                "model",
                "clients",
                "clients_per_round",
                "executor",
                "seconds_per_round",
                "projected_500_rounds_s",
                "peak_mb",
            ],
        )
    )
    print(f"\ndata: {out['fmnist']['data']}")
    with tempfile.TemporaryDirectory() as tmp:
        out["determinism"] = section_determinism(device_opt, 3 if args.quick else 30, Path(tmp))
    d = out["determinism"]
    print(
        f"\n## The default run twice ({d['rounds']} rounds)\n\nsame model_sha256: {d['same']} ({d['sha_first'][:16]})"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
