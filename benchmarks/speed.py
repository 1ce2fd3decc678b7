"""Wall-clock speed of sparse local training vs dense, measured interleaved in one run.

Usage::

    python benchmarks/speed.py [--quick] [--json FILE] [--only SECTION ...] [--threads N]

``--threads`` (default 1, the default of ``local.threads``: what a client trains with, and what
each ``--jobs`` worker gets on a 2-core machine) sets the intra-op threads of the step sections.

Sections (each prints a table; every ratio is dense time / variant time, so > 1 is faster):

* ``steps``: one local-training step (batch 32, SGD momentum, the method's hooks exactly as in
  ``train_local``) per method and sparsity, for the default CNN, resnet20 and resnet18 at 32x32
  and the 1024-wide MLP (width 4). The medians leave out ZeroFL's exact top-k refreshes (one
  every ``topk_period`` steps), so a second row, ``zerofl 90%, refresh every 10 steps``, adds
  the extra time of a refresh step (timed against ordinary ZeroFL steps) divided by the period:
  what a client pays per step on average. On the conv models, ``zerofl 90%, act_sparsity=0``
  is ZeroFL without the activation top-k (weights only), which separates the cost of the pass
  over each layer's input from the rest.
* ``convbwd``: FedSkel's conv backward alone at skeleton ratio 0.1 on resnet18's 128-512 channel
  layers (compact kernel vs the dense backward).
* ``bf16``: bf16 autocast vs fp32 on a resnet18 step.
* ``structured``: static_mask with ``method.compact`` on resnet18 at about 10% of its parameters
  (a channel mask, trained as the compacted network) vs dense.
* ``jobs``: a 20-round default digits run with jobs=2 vs jobs=1 (same model_sha256 required).
* ``overhead``: the simulator's own time (wall-clock round minus client compute) in a default round.
* ``scale``: 10,000 clients with 10 per round: peak RSS and per-round time vs 100 clients.

Timing: variants run in a fresh random order every round; each variant's time in a round is the
median of ``inner`` steps; the reported time is the median over rounds and the ratio the median
over rounds of the paired ratio. The machine's load average is printed with every table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sparsefl.accounting import profile_model  # noqa: E402
from sparsefl.config import ModelConfig  # noqa: E402
from sparsefl.kernels.skeleton import SkeletonConvFn  # noqa: E402
from sparsefl.masks import default_scope  # noqa: E402
from sparsefl.methods.base import LocalHooks  # noqa: E402
from sparsefl.methods.fedskel import SkeletonHooks, skeleton_layers, skeleton_size  # noqa: E402
from sparsefl.methods.hidenseek import HideNseekConfig, SignSupermaskHooks, tensor_roles  # noqa: E402
from sparsefl.methods.static_mask import StaticMaskHooks  # noqa: E402
from sparsefl.methods.zerofl import ZeroFLConfig, ZeroFLHooks, sparse_scope  # noqa: E402
from sparsefl.models import build_model  # noqa: E402
from sparsefl.runtime.client import train_step  # noqa: E402
from sparsefl.runtime.sgd import SGD  # noqa: E402

SHAPE = (3, 32, 32)
BATCH = 32
RESULTS: dict[str, list[dict]] = {}
#: model -> (a ZeroFL step that refreshes its top-k thresholds, the refresh period), set by step_variants
REFRESH: dict[str, tuple[Callable[[], None], int]] = {}


def loadavg() -> str:
    return open("/proc/loadavg").read().split(" ")[0:3].__str__()


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, inner: int, ref: str = "dense") -> dict:
    """Median seconds per call and paired ratio vs ``ref`` for every variant."""
    for f in variants.values():
        f()
        f()
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for n in order:
            ts = []
            for _ in range(inner):
                t0 = time.perf_counter()
                variants[n]()
                ts.append(time.perf_counter() - t0)
            times[n].append(statistics.median(ts))
    out = {}
    for n, ts in times.items():
        ratios = [a / b for a, b in zip(times[ref], ts)]
        out[n] = {"ms": 1e3 * statistics.median(ts), "ratio": statistics.median(ratios)}
    return out


def table(title: str, res: dict, extra: dict | None = None) -> None:
    print(f"\n## {title}   (load average {loadavg()})")
    print(f"{'variant':44s} {'ms':>10s} {'x dense':>9s}")
    rows = []
    for n, r in res.items():
        print(f"{n:44s} {r['ms']:10.2f} {r['ratio']:9.2f}")
        rows.append({"variant": n, **r, **(extra or {})})
    RESULTS.setdefault(title, []).extend(rows)


# ---------------------------------------------------------------------------------------- steps
def make_step(hooks: LocalHooks, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> Callable[[], None]:
    """One step of ``train_local`` (:func:`sparsefl.runtime.client.train_step`) with ``hooks``."""
    opt = SGD(hooks.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    hooks.model.train()
    state = {"step": 0}

    def step() -> None:
        train_step(hooks, opt, x, y, state["step"], bf16)
        state["step"] += 1

    return step


def model_of(name: str, shape: tuple[int, ...] = SHAPE, width: float = 1.0) -> nn.Module:
    return build_model(ModelConfig(name=name, width=width), shape, 10, 0)


def random_mask(model: nn.Module, scope: list[str], sparsity: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = model.state_dict()
    return {n: torch.rand(sd[n].shape, generator=g) >= sparsity for n in scope}


def first_skeleton(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    out = {}
    for layer in skeleton_layers(model, False, "train"):
        c = dict(model.named_parameters())[layer.name].shape[0]
        m = torch.zeros(c, dtype=torch.bool)
        m[torch.randperm(c, generator=torch.Generator().manual_seed(2))[: skeleton_size(c, ratio)]] = True
        out[layer.name] = m
    return out


def step_variants(name: str, shape: tuple[int, ...], width: float, quick: bool) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    v: dict[str, Callable[[], None]] = {}

    def fresh() -> nn.Module:
        return model_of(name, shape, width)

    m = fresh()
    prof = profile_model(m, shape)
    v["dense"] = make_step(LocalHooks(m, prof), x, y)
    is_conv = name != "mlp"
    if is_conv:
        for r in (0.1,) if quick else (0.1, 0.3):
            for bw in ("compact", "mask"):
                m = fresh()
                h = SkeletonHooks(m, prof, skeleton_layers(m, False, "train"), r, first_skeleton(m, r), 1, backward=bw)
                v[f"fedskel r={r} backward={bw}"] = make_step(h, x, y)
    for sp in (0.9, 0.95) if not quick else (0.95,):
        for kernel in ("auto",) if is_conv else ("dense", "auto"):
            m = fresh()
            scope = default_scope(m)
            v[f"static_mask {int(sp * 100)}% kernel={kernel}"] = make_step(
                StaticMaskHooks(m, prof, random_mask(m, scope, sp), kernel, BATCH), x, y
            )
    m = fresh()
    zc = ZeroFLConfig(sparsity=0.9)
    zh = ZeroFLHooks(m, prof, sparse_scope(m, zc), zc)
    v["zerofl 90%"] = zstep = make_step(zh, x, y)

    def zerofl_refresh() -> None:
        """A step that recomputes every exact top-k threshold (every topk_period-th step)."""
        for c in (*zh.weight_topk.values(), *zh.act_topk.values()):
            c.tau = None
        zstep()

    REFRESH[name] = (zerofl_refresh, zc.topk_period)
    if is_conv:
        # the same without SWAT's activation top-k: what the weight side and the bookkeeping
        # cost, so the table separates them from the pass over each layer's input
        m = fresh()
        zc0 = ZeroFLConfig(sparsity=0.9, act_sparsity=0.0)
        v["zerofl 90%, act_sparsity=0"] = make_step(ZeroFLHooks(m, prof, sparse_scope(m, zc0), zc0), x, y)
    m = fresh()
    hc = HideNseekConfig(sparsity=0.9)
    roles = tensor_roles(m, hc)
    sd = m.state_dict()
    scores = {k: torch.randn(sd[k].shape, generator=g).abs() + 0.1 for k in roles.scope}
    hmask = random_mask(m, roles.prune_scope, 0.9)
    with torch.no_grad():  # W0 = M * W_init, as the server sends it
        for k, keep in hmask.items():
            dict(m.named_parameters())[k].mul_(keep)
    v["hidenseek 90%"] = make_step(SignSupermaskHooks(m, prof, roles, hc, scores, 1.0, {}, {}, hmask), x, y)
    return v


def bench_steps(quick: bool) -> None:
    models = [("cnn", SHAPE, 1.0), ("resnet20", SHAPE, 1.0), ("resnet18", SHAPE, 1.0), ("mlp", SHAPE, 4.0)]
    for name, shape, width in models:
        big = name == "resnet18"
        rounds = (3 if big else 5) if quick else 11
        inner = 1 if big else (3 if quick else 5)
        variants = step_variants(name, shape, width, quick)
        res = interleaved(variants, rounds, inner)
        # the step medians leave out ZeroFL's exact top-k refreshes; a client pays one every
        # topk_period steps: time refresh steps against ordinary ones and add the amortised row
        refresh, period = REFRESH[name]
        both = interleaved({"zerofl": variants["zerofl 90%"], "refresh": refresh}, 3 if big else 5, 1, ref="zerofl")
        ms = res["zerofl 90%"]["ms"] + (both["refresh"]["ms"] - both["zerofl"]["ms"]) / period
        z = res["zerofl 90%"]
        res[f"zerofl 90%, refresh every {period} steps"] = {"ms": ms, "ratio": z["ratio"] * z["ms"] / ms}
        table(f"step: {name} (width {width}) at {shape}, batch {BATCH}, fp32", res, {"model": name})


# -------------------------------------------------------------------------------------- convbwd
def bench_convbwd(quick: bool) -> None:
    cb = torch.ops.aten.convolution_backward
    layers = [(128, 16), (256, 8), (512, 4)]
    data = []
    for c, h in layers:
        x = torch.randn(BATCH, c, h, h)
        w = torch.randn(c, c, 3, 3)
        gy = torch.randn(BATCH, c, h, h)
        k = skeleton_size(c, 0.1)
        idx = torch.sort(torch.randperm(c, generator=torch.Generator().manual_seed(3))[:k]).values
        data.append((x, w, gy, idx))

    def dense() -> None:
        for x, w, gy, _ in data:
            cb(gy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])

    class Ctx:
        needs_input_grad = (True, True, False)

    def compact_bwd() -> None:
        for x, w, gy, idx in data:
            ctx = Ctx()
            ctx.saved_tensors = (x, w, idx)
            ctx.conf = ([1, 1], [1, 1], [1, 1], 1, x.dtype, w.dtype, False)
            ctx.sink = ({}, w)  # the weight's skeleton rows handed over, as FedSkel's training does
            ctx.handoff = None
            SkeletonConvFn.backward(ctx, gy)

    res = interleaved({"dense": dense, "fedskel compact r=0.1": compact_bwd}, 7 if quick else 15, 3)
    table("conv backward: resnet18 128/256/512-channel 3x3 layers, batch 32, r=0.1", res)


# ----------------------------------------------------------------------------------------- bf16
def bench_bf16(quick: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *SHAPE, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    m1, m2 = model_of("resnet18"), model_of("resnet18")
    prof = profile_model(m1, SHAPE)
    m3 = model_of("resnet18").to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    # FedSkel r=0.1 in bf16 + channels_last (what local.precision=bf16 runs): the two stack
    m4 = model_of("resnet18").to(memory_format=torch.channels_last)
    layers = skeleton_layers(m4, False, "train")
    skel = SkeletonHooks(m4, prof, layers, 0.1, first_skeleton(m4, 0.1), 1, backward="compact")
    res = interleaved(
        {
            "dense": make_step(LocalHooks(m1, prof), x, y),
            "dense bf16 autocast": make_step(LocalHooks(m2, prof), x, y, bf16=True),
            "dense bf16 autocast + channels_last": make_step(LocalHooks(m3, prof), xc, y, bf16=True),
            "fedskel r=0.1 bf16 autocast + channels_last": make_step(skel, xc, y, bf16=True),
        },
        3 if quick else 15,  # about 1 s a step: a 7-round median moved by 10% between runs
        1,
    )
    table("bf16 vs fp32: resnet18 step, batch 32", res)


# ----------------------------------------------------------------------------------- structured
def bench_structured(quick: bool) -> None:
    """static_mask with method.compact: a channel-structured mask at ~10% of resnet18's
    parameters, trained as the compacted network (the hooks a client runs; compaction itself,
    once per round, is outside the timed step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *SHAPE, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    big = model_of("resnet18")
    prof = profile_model(big, SHAPE)
    # the same first-k channels of every conv (residual streams then line up): ~10% of params
    mask = {}
    for n, mod in big.named_modules():
        if isinstance(mod, nn.Conv2d):
            keep = torch.zeros(mod.out_channels, dtype=torch.bool)
            keep[: max(1, round(mod.out_channels * 0.316))] = True
            mask[f"{n}.weight"] = keep.view(-1, 1, 1, 1).expand_as(mod.weight).clone()
    hooks = StaticMaskHooks(big, prof, mask, compact=True)
    assert hooks._compact is not None
    ps, pb = hooks._compact.plan.kept_params(big)
    res = interleaved(
        {
            "dense": make_step(LocalHooks(model_of("resnet18"), prof), x, y),
            f"static_mask compact=true, {ps / pb:.1%} of params": make_step(hooks, x, y),
        },
        3 if quick else 7,
        1,
    )
    title = "structured: resnet18 channel mask trained compacted vs dense, batch 32"
    table(title, res, {"params": ps, "dense_params": pb})


# ------------------------------------------------------------------------------- run-level ones
RUN_SNIPPET = """
import json, sys, time
sys.path.insert(0, {src!r})
import sparsefl
from sparsefl.config import load_config
if __name__ == "__main__":
    from sparsefl.experiment.runner import run_experiment
    cfg = load_config(None, {overrides!r})
    ends = []  # when each round's record, metrics and checkpoint were written
    t = time.perf_counter()
    s = run_experiment(cfg, {out!r}, progress=lambda rec, info: ends.append(time.perf_counter()))
    dt = time.perf_counter() - t
    json.dump([b - a for a, b in zip(ends, ends[1:])], open({out!r} + "/round_walls.json", "w"))
    # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss keeps the (large) benchmark parent's peak
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print(json.dumps({{"seconds": dt, "sha": s.get("model_sha256"), "acc": s.get("final_accuracy"),
                       "rss_mb": int(hwm) / 1024}}))
"""


def run_cfg(overrides: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix="speed-")
    code = RUN_SNIPPET.format(src=str(ROOT / "src"), overrides=overrides, out=out)
    script = Path(out) / "run.py"
    script.write_text(code)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["folder"] = out
    return r


def bench_jobs(quick: bool) -> None:
    rounds = 5 if quick else 20
    base = [f"federation.rounds={rounds}"]
    t: dict[int, list[float]] = {1: [], 2: []}
    late: dict[int, list[float]] = {1: [], 2: []}
    shas: dict[int, set] = {1: set(), 2: set()}
    ratios, late_ratios = [], []
    for _ in range(1 if quick else 7):  # alternating pairs: this machine's speed drifts by 20-40%
        for j in (1, 2):
            r = run_cfg([*base, f"jobs={j}"])
            t[j].append(r["seconds"])
            shas[j].add(r["sha"])
            # the second half of the rounds: steady state (round_seconds is the critical path:
            # sampling to the new global model; the evaluation overlaps the next round)
            recs = [json.loads(line) for line in open(Path(r["folder"]) / "metrics.jsonl")]
            late[j].append(statistics.median([x["round_seconds"] for x in recs[len(recs) // 2 :]]))
        ratios.append(t[1][-1] / t[2][-1])
        late_ratios.append(late[1][-1] / late[2][-1])
    res = {
        "dense": {"ms": 1e3 * statistics.median(t[1]), "ratio": 1.0},
        "jobs=2": {"ms": 1e3 * statistics.median(t[2]), "ratio": statistics.median(ratios)},
        "jobs=1, median round of the second half": {"ms": 1e3 * statistics.median(late[1]), "ratio": 1.0},
        "jobs=2, median round of the second half": {
            "ms": 1e3 * statistics.median(late[2]),
            "ratio": statistics.median(late_ratios),
        },
    }
    table(
        f"jobs: {rounds}-round default digits run, jobs=2 vs jobs=1 (column 'dense' = jobs=1)",
        res,
        {"same_sha": shas[1] == shas[2] and len(shas[1]) == 1},
    )
    print(f"model_sha256 jobs=1 {sorted(shas[1])} jobs=2 {sorted(shas[2])}")


def bench_overhead(quick: bool) -> None:
    """Round time outside client compute. The evaluation of the global model (the user's
    metric, every round by default) and the round's metrics and checkpoint writes run in the
    server thread while the next round trains; what remains on the critical path is the
    simulator's bookkeeping (tasks, encoding the broadcast, decoding uploads, the state store,
    aggregation, the checkpoint's snapshot)."""
    r = run_cfg([f"federation.rounds={3 if quick else 30}"])
    recs = [json.loads(line) for line in open(Path(r["folder"]) / "metrics.jsonl")][1:]
    # a round's wall time from one round's end to the next (every round's progress call comes
    # after its writes, in round order)
    walls = json.load(open(Path(r["folder"]) / "round_walls.json"))
    outside = statistics.median([(w - x["client_seconds"]) / w for w, x in zip(walls, recs)])
    ev = statistics.median([x["eval_seconds"] / w for w, x in zip(walls, recs)])
    per = statistics.median(walls) * 1e3
    print(f"\n## simulator overhead, default config, rounds 2..{len(recs) + 1}   (load {loadavg()})")
    print(f"outside client compute: {outside:.1%} of a round (per round {per:.0f} ms, wall clock)")
    print(f"  (evaluation of the global model, {ev:.1%} of a round, and the writes run in the server thread)")
    print(f"whole {len(recs) + 1}-round run: {r['seconds']:.2f} s")
    RESULTS.setdefault("overhead", []).append(
        {"outside_fraction": outside, "eval_fraction_overlapped": ev, "round_ms": per, "run_seconds": r["seconds"]}
    )


def bench_scale(quick: bool) -> None:
    import numpy as np

    folder = Path(tempfile.mkdtemp(prefix="speed-npz-"))
    n = 100_000 if not quick else 20_000
    rng = np.random.default_rng(0)
    yv = rng.integers(0, 10, n)
    xv = (rng.normal(0, 1, (10, 1, 8, 8))[yv] + rng.normal(0, 0.8, (n, 1, 8, 8))).astype(np.float32)
    np.savez(folder / "data.npz", x_train=xv, y_train=yv, x_test=xv[:1000], y_test=yv[:1000])
    rounds = 5
    rows = {}
    for clients in (100, 10_000 if not quick else 2_000):
        r = run_cfg(
            [
                "data.name=npz",
                f"data.dir={folder}",
                "data.partition=iid",
                f"federation.num_clients={clients}",
                "federation.clients_per_round=10",
                f"federation.rounds={rounds}",
                "local.steps=5",  # the same work per client whatever its share of the data
            ]
        )
        recs = [json.loads(line) for line in open(Path(r["folder"]) / "metrics.jsonl")]
        per = statistics.median([rec["round_seconds"] for rec in recs[1:]])
        rows[clients] = (r["rss_mb"], per)
    print(f"\n## scale: clients with 10 per round, 5 local steps each, iid npz ({n} samples)   (load {loadavg()})")
    for c, (rss, per) in rows.items():
        print(f"{c:>8d} clients: peak RSS {rss:7.0f} MB, median round {per * 1e3:7.1f} ms")
        RESULTS.setdefault("scale", []).append({"clients": c, "rss_mb": rss, "round_ms": per * 1e3})


SECTIONS = {
    "convbwd": bench_convbwd,
    "steps": bench_steps,
    "bf16": bench_bf16,
    "structured": bench_structured,
    "jobs": bench_jobs,
    "overhead": bench_overhead,
    "scale": bench_scale,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller runs (smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="write every measured row here")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of the step benchmarks (default 1 = local.threads' default, what a client trains with)",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    random.seed(0)
    print(f"torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} CPUs, load {loadavg()}")
    for name in a.only or list(SECTIONS):
        SECTIONS[name](a.quick)
    if a.json is not None:
        a.json.write_text(json.dumps(RESULTS, indent=1))
    print(f"\npeak RSS of the benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
