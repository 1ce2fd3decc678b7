"""The benchmark driver: a matrix of experiments, run (in parallel), collected into one table.

A *suite* (TOML) has:

* ``[base]``: dotted config keys shared by every run;
* ``seeds``: the seeds every run is repeated with;
* ``[[runs]]``: one entry per compared setting, with a ``label`` and its own dotted keys; a
  list value expands into one run per element (so ``"method.sparsity" = [0.9, 0.95]`` makes two);
* ``[matrix]``: axes applied to every run (e.g. ``"data.alpha" = [0.1, 1.0]``);
* ``[[claims]]``: statements from the literature checked against the results
  (see :mod:`sparsefl.experiment.report`).

Each concrete run gets its own run folder under ``OUT/runs/`` named by label and config hash,
so re-running a suite skips finished runs and resumes interrupted ones (the run folder's own
resume logic). Runs execute in separate processes, ``jobs`` at a time.
"""

from __future__ import annotations

import csv
import itertools
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from sparsefl.config import ExperimentConfig, config_hash, load_config
from sparsefl.errors import ConfigError, SparseflError
from sparsefl.orphans import exit_with_parent
from sparsefl.state import atomic_write_text

BUILTIN_SUITES = ("quick", "paper")

RESULT_COLUMNS = (
    "label", "method", "sparsity", "partition", "alpha", "seed", "final_accuracy", "best_accuracy",
    "uplink_bytes", "downlink_bytes", "train_flops", "train_flops_dense", "client_seconds", "wall_seconds",
    "rounds", "density", "inference_flops", "inference_flops_dense", "model_sha256", "run_dir",
)  # fmt: skip


@dataclass(frozen=True)
class PlannedRun:
    """One concrete experiment of a suite."""

    label: str
    overrides: tuple[str, ...]
    cfg: ExperimentConfig

    @property
    def folder_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)
        return f"{safe}-s{self.cfg.seed}-{config_hash(self.cfg)[:10]}"


@dataclass(frozen=True)
class Suite:
    """A parsed suite file."""

    name: str
    description: str
    base: dict[str, Any]
    seeds: tuple[int, ...]
    runs: tuple[dict[str, Any], ...]
    matrix: dict[str, list[Any]]
    claims: tuple[dict[str, Any], ...]
    text: str

    def plan(self) -> list[PlannedRun]:
        """Every concrete run, in a stable order; configs validated now, before any work."""
        planned: list[PlannedRun] = []
        axes = list(self.matrix.items())
        for entry in self.runs:
            label = entry.get("label")
            if not isinstance(label, str):
                raise ConfigError("runs.label", label, "a string naming the run")
            own = {k: v for k, v in entry.items() if k != "label"}
            for own_point in _expand(own):
                for axis_point in _expand(dict(axes)):
                    for seed in self.seeds:
                        keys = {**self.base, **axis_point, **own_point, "seed": seed}
                        overrides = tuple(f"{k}={_toml_value(v)}" for k, v in keys.items())
                        cfg = load_config(overrides=list(overrides))
                        planned.append(PlannedRun(label, overrides, cfg))
        return planned


def _expand(keys: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The cartesian product of list-valued keys (scalars stay fixed)."""
    names = list(keys)
    values = [v if isinstance(v, list) else [v] for v in keys.values()]
    for combo in itertools.product(*values):
        yield dict(zip(names, combo, strict=True))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite (``quick``, ``paper``) or a suite TOML file."""
    if name_or_path in BUILTIN_SUITES:
        text = resources.files("sparsefl.experiment.suites").joinpath(f"{name_or_path}.toml").read_text()
        name = name_or_path
    else:
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError("--suite", name_or_path, "quick, paper, or an existing suite TOML file")
        text, name = p.read_text(), p.stem
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--suite", name_or_path, f"valid TOML ({e})") from None
    known = {"description", "base", "seeds", "runs", "matrix", "claims"}
    extra = set(raw) - known
    if extra:
        raise ConfigError(f"suite.{sorted(extra)[0]}", None, "known suite keys: " + ", ".join(sorted(known)))
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError("suite.seeds", seeds, "a non-empty list of integers")
    if not raw.get("runs"):
        raise ConfigError("suite.runs", None, "at least one [[runs]] entry")
    return Suite(
        name=name,
        description=str(raw.get("description", "")),
        base=dict(raw.get("base", {})),
        seeds=tuple(seeds),
        runs=tuple(raw["runs"]),
        matrix={k: (v if isinstance(v, list) else [v]) for k, v in raw.get("matrix", {}).items()},
        claims=tuple(raw.get("claims", [])),
        text=text,
    )


def _run_one(run: PlannedRun, folder: str) -> dict[str, Any]:
    """Worker-process entry: run (or resume, or report) one experiment."""
    from sparsefl.experiment.runner import run_experiment

    try:
        summary = run_experiment(run.cfg, folder)
    except SparseflError as e:
        return {"error": str(e)}
    return summary


def result_row(run: PlannedRun, summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One ``results.csv`` row from a run's summary."""
    cfg = run.cfg
    return {
        "label": run.label,
        "method": cfg.method.name,
        "sparsity": cfg.method.sparsity,
        "partition": cfg.data.partition,
        "alpha": cfg.data.alpha if cfg.data.partition == "dirichlet" else "",
        "seed": cfg.seed,
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "uplink_bytes": summary["uplink_bytes_total"],
        "downlink_bytes": summary["downlink_bytes_total"],
        "train_flops": summary["train_flops_total"],
        "train_flops_dense": summary["train_flops_dense_total"],
        "client_seconds": summary["client_seconds_total"],
        "wall_seconds": summary["wall_seconds"],
        "rounds": summary["rounds"],
        "density": summary["density"],
        "inference_flops": summary.get("inference_flops_per_sample"),
        "inference_flops_dense": summary.get("inference_flops_per_sample_dense"),
        "model_sha256": summary["model_sha256"],
        "run_dir": str(folder),
    }


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    jobs: int = 1,
    on_done: Callable[[PlannedRun, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every planned run (``jobs`` processes at a time), write ``results.csv`` and the report.

    Returns the result rows. A run that fails with a user error is reported in ``failed.txt``
    and left out of the table; the others go on.
    """
    t_start = time.perf_counter()
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "suite.toml", suite.text)
    planned = suite.plan()
    rows: dict[int, dict[str, Any]] = {}
    errors: list[str] = []

    def collect(i: int, summary: dict[str, Any]) -> None:
        run = planned[i]
        if "error" in summary:
            errors.append(f"{run.folder_name}: {summary['error']}")
        else:
            rows[i] = result_row(run, summary, out / "runs" / run.folder_name)
        if on_done is not None:
            on_done(run, summary)

    if jobs == 1:
        for i, run in enumerate(planned):
            collect(i, _run_one(run, str(out / "runs" / run.folder_name)))
    else:
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=exit_with_parent, initargs=(os.getpid(),)
        ) as pool:
            pending = {pool.submit(_run_one, r, str(out / "runs" / r.folder_name)): i for i, r in enumerate(planned)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    collect(pending.pop(f), f.result())
    ordered = [rows[i] for i in sorted(rows)]
    write_results(out / "results.csv", ordered)
    atomic_write_text(out / "failed.txt", "".join(e + "\n" for e in errors))
    from sparsefl.experiment.report import write_report

    write_report(out, suite, ordered, elapsed=time.perf_counter() - t_start, jobs=jobs)
    return ordered


def write_results(path: Path, rows: list[dict[str, Any]]) -> None:
    """``results.csv``: one row per run."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RESULT_COLUMNS))
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())
