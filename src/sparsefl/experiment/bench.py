"""The benchmark driver: a matrix of experiments, run (in parallel), collected into one table.

A *suite* (TOML) has:

* ``[base]``: dotted config keys shared by every run;
* ``seeds``: the seeds every run is repeated with;
* ``[[runs]]``: one entry per compared setting, with a ``label`` and its own dotted keys; a
  list value expands into one run per element (so ``"method.sparsity" = [0.9, 0.95]`` makes two);
  an optional ``sweep`` table (``sweep = {"local.lr" = [0.01, 0.05, 0.1]}``) tunes those keys,
  and an optional ``seeds`` list replaces the suite's for that label (e.g. 5 seeds where a claim
  is close: claims pair runs by seed, so give its comparator the same seeds);
* ``[matrix]``: axes applied to every run (e.g. ``"data.alpha" = [0.1, 1.0]``);
* ``[tuning]``: ``val_fraction`` (default 0.1) and ``seeds`` (default: the first seed) of sweeps;
* ``score_evals``: a run's ``score`` is the mean of its last this many evaluations (default 3);
* ``[[claims]]``: statements from the literature checked against the results
  (see :mod:`sparsefl.experiment.report`); a claim naming a missing label is refused at load.

A label with a sweep is *tuned* first: each swept value runs (``tuning.seeds``) with
``data.val_fraction`` of every client's data held out, and the value whose global model scores
best on the pooled validation splits (mean of the last ``score_evals`` evaluations, averaged over
the tuning seeds; ties go to the first listed) is chosen per label and context (its own list
values and matrix point). The label's seeds then run at that value on the clients' data (all
of it unless the suite itself sets ``data.val_fraction``), the test set unseen by the choice.
``tuning.json`` and the report list the choices.

Each concrete run gets its own run folder under ``OUT/runs/`` (sweeps under ``OUT/sweeps/``)
named by label and config hash, so re-running a suite skips finished runs and resumes interrupted
ones (the run folder's own resume logic). Runs execute in separate processes, ``jobs`` at a time.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import statistics
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

BUILTIN_SUITES = ("quick", "paper", "kd", "dst")

RESULT_COLUMNS = (
    "label", "method", "sparsity", "partition", "alpha", "matrix", "seed", "final_accuracy", "best_accuracy", "score",
    "uplink_bytes", "downlink_bytes", "train_flops", "train_flops_dense", "client_seconds", "wall_seconds",
    "rounds", "density", "inference_flops", "inference_flops_dense", "model_sha256", "tuned", "warnings", "run_dir",
)  # fmt: skip

#: Columns of ``sweeps.csv``: the tuning runs, scored on the validation splits.
SWEEP_COLUMNS = ("label", "context", "point", "seed", "val_score", "score", "final_accuracy", "warnings", "run_dir")

#: Claim fields a suite may give (see :mod:`sparsefl.experiment.report`).
CLAIM_KEYS = ("text", "source", "comparator", "budget", "a", "b", "metric", "expect", "margin", "same_sparsity")
CLAIM_METRICS = (
    "final_accuracy", "best_accuracy", "score", "uplink_bytes", "downlink_bytes", "train_flops", "client_seconds",
    "wall_seconds", "density", "inference_flops",
)  # fmt: skip

#: Keys of a ``[[runs]]`` entry that are not config keys.
ENTRY_KEYS = ("label", "sweep", "seeds")
Point = tuple[tuple[str, Any], ...]  # swept keys and their values, in the suite's order
Choices = dict[tuple[str, str], Point]  # (label, context) -> the chosen point
RowFn = Callable[["PlannedRun", dict[str, Any], Path, int], dict[str, Any]]


@dataclass(frozen=True)
class PlannedRun:
    """One concrete experiment of a suite; ``context`` names its own list values and matrix
    point, ``point`` its swept values, ``phase`` is ``run`` or ``sweep``."""

    label: str
    overrides: tuple[str, ...]
    cfg: ExperimentConfig
    context: str = ""
    point: Point = ()
    phase: str = "run"
    #: the suite's matrix values other than sparsity, partition and alpha (a claim compares
    #: labels within one such point)
    matrix: str = ""

    @property
    def folder_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)
        return f"{safe}-s{self.cfg.seed}-{config_hash(self.cfg)[:10]}"

    @property
    def subdir(self) -> str:
        """``runs`` or ``sweeps``: where under the suite's output folder the run folder goes."""
        return "sweeps" if self.phase == "sweep" else "runs"


def point_text(point: Point) -> str:
    """``local.lr=0.05, local.momentum=0.9`` (empty for no swept keys)."""
    return ", ".join(f"{k}={_toml_value(v)}" for k, v in point)


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
    val_fraction: float = 0.1
    tuning_seeds: tuple[int, ...] = ()
    score_evals: int = 3

    def _contexts(self) -> Iterator[tuple[str, str, dict[str, Any], dict[str, list[Any]], tuple[int, ...]]]:
        """(label, context, keys without the seed, sweep, seeds) for every run entry and list point."""
        for entry in self.runs:
            label = entry["label"]
            sweep = entry.get("sweep") or {}
            seeds = tuple(entry.get("seeds", self.seeds))
            own = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
            varying = [k for k, v in own.items() if isinstance(v, list)] + [k for k, v in self.matrix.items()]
            for own_point in _expand(own):
                for axis_point in _expand(dict(self.matrix)):
                    keys = {**self.base, **axis_point, **own_point}
                    context = ", ".join(f"{k}={_toml_value(keys[k])}" for k in varying)
                    yield label, context, keys, sweep, seeds

    def _make(self, label: str, keys: dict[str, Any], context: str, point: Point, phase: str) -> PlannedRun:
        overrides = tuple(f"{k}={_toml_value(v)}" for k, v in keys.items())
        shared = [k for k in self.matrix if k not in ("method.sparsity", "data.partition", "data.alpha")]
        matrix = ", ".join(f"{k}={_toml_value(keys[k])}" for k in shared)
        return PlannedRun(label, overrides, load_config(overrides=list(overrides)), context, point, phase, matrix)

    def sweep_plan(self) -> list[PlannedRun]:
        """The tuning runs: every swept point of every context, with ``tuning.seeds`` and a
        validation split of ``tuning.val_fraction``; configs validated now."""
        planned = []
        for label, context, keys, sweep, _ in self._contexts():
            for sp in _expand(sweep) if sweep else ():
                point = tuple(sp.items())
                for seed in self.tuning_seeds:
                    run_keys = {**keys, **sp, "data.val_fraction": self.val_fraction, "seed": seed}
                    planned.append(self._make(label, run_keys, context, point, "sweep"))
        return planned

    def plan(self, chosen: Choices | None = None) -> list[PlannedRun]:
        """Every concrete run, in a stable order; configs validated now, before any work.

        A tuned label runs at its ``chosen`` point (a context missing from ``chosen`` is left
        out: none of its sweep runs finished). Without ``chosen`` every swept point is validated
        and the first one stands in, so the plan has the final number of runs.
        """
        planned: list[PlannedRun] = []
        for label, context, keys, sweep, seeds in self._contexts():
            points = [tuple(sp.items()) for sp in _expand(sweep)]
            if sweep and chosen is not None:
                if (label, context) not in chosen:
                    continue
                points = [chosen[(label, context)]]
            for seed in seeds:
                made = [self._make(label, {**keys, **dict(p), "seed": seed}, context, p, "run") for p in points]
                planned.append(made[0])
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
    """A built-in suite (``quick``, ``paper``, ...) or a suite TOML file.

    Raises
    ------
    ConfigError
        An unknown suite key, a bad ``[[runs]]`` entry, sweep or tuning value, or a claim with
        an unknown field, metric or expectation or naming a label the suite does not run.
    """
    if name_or_path in BUILTIN_SUITES:
        text = resources.files("sparsefl.experiment.suites").joinpath(f"{name_or_path}.toml").read_text()
        name = name_or_path
    else:
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError("--suite", name_or_path, ", ".join(BUILTIN_SUITES) + ", or an existing suite TOML file")
        text, name = p.read_text(), p.stem
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--suite", name_or_path, f"valid TOML ({e})") from None
    known = {"description", "base", "seeds", "runs", "matrix", "claims", "tuning", "score_evals"}
    extra = set(raw) - known
    if extra:
        raise ConfigError(f"suite.{sorted(extra)[0]}", None, "known suite keys: " + ", ".join(sorted(known)))
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError("suite.seeds", seeds, "a non-empty list of integers")
    if not raw.get("runs"):
        raise ConfigError("suite.runs", None, "at least one [[runs]] entry")
    runs = tuple(raw["runs"])
    for entry in runs:
        _check_entry(entry)
    tuning = raw.get("tuning", {})
    unknown = set(tuning) - {"val_fraction", "seeds"}
    if unknown:
        raise ConfigError(f"tuning.{sorted(unknown)[0]}", None, "known tuning keys: seeds, val_fraction")
    vf = tuning.get("val_fraction", 0.1)
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
        raise ConfigError("tuning.val_fraction", vf, "a number > 0 and < 1")
    tseeds = tuning.get("seeds", seeds[:1])
    if not isinstance(tseeds, list) or not tseeds or not all(isinstance(s, int) for s in tseeds):
        raise ConfigError("tuning.seeds", tseeds, "a non-empty list of integers")
    evals = raw.get("score_evals", 3)
    if isinstance(evals, bool) or not isinstance(evals, int) or evals < 1:
        raise ConfigError("suite.score_evals", evals, "an integer >= 1")
    claims = tuple(raw.get("claims", []))
    check_claim_fields(claims, [e["label"] for e in runs])
    return Suite(
        name=name,
        description=str(raw.get("description", "")),
        base=dict(raw.get("base", {})),
        seeds=tuple(seeds),
        runs=runs,
        matrix={k: (v if isinstance(v, list) else [v]) for k, v in raw.get("matrix", {}).items()},
        claims=claims,
        text=text,
        val_fraction=float(vf),
        tuning_seeds=tuple(tseeds),
        score_evals=evals,
    )


def _check_entry(entry: Any) -> None:
    """A ``[[runs]]`` entry: a string label, its own seeds if any, and a sweep of non-empty lists
    of keys it does not set."""
    label = entry.get("label") if isinstance(entry, dict) else None
    if not isinstance(label, str):
        raise ConfigError("runs.label", label, "a string naming the run")
    seeds = entry.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise ConfigError(f"runs[{label}].seeds", seeds, "a non-empty list of integers")
    sweep = entry.get("sweep", {})
    if not isinstance(sweep, dict):
        raise ConfigError(f"runs[{label}].sweep", sweep, 'a table of keys to lists, e.g. {"local.lr" = [0.01, 0.1]}')
    for k, v in sweep.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"runs[{label}].sweep.{k}", v, "a non-empty list of values to try")
        if k in entry:
            raise ConfigError(f"runs[{label}].sweep.{k}", v, "a key the run entry does not also set")


def check_claim_fields(claims: tuple[dict[str, Any], ...], labels: list[str]) -> None:
    """Refuse, before any run, a claim with an unknown field, metric or expectation, a bad
    margin, or naming a label the suite does not run (ConfigError naming the claim)."""
    for i, c in enumerate(claims):
        what = f"claims[{i}]"
        if not isinstance(c, dict):
            raise ConfigError(what, c, "a table with text, a, b, metric, expect")
        name = f" (claim {c.get('text', what)!r})"
        unknown = [k for k in c if k not in CLAIM_KEYS]
        if unknown:
            raise ConfigError(f"{what}.{unknown[0]}", c[unknown[0]], "known claim keys: " + ", ".join(CLAIM_KEYS))
        if c.get("a") not in labels:
            raise ConfigError(f"{what}.a", c.get("a"), "a label of this suite's runs" + name)
        b = c.get("b")
        if (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b)) and b not in labels:
            raise ConfigError(f"{what}.b", b, "a label of this suite's runs, or a number (e.g. chance)" + name)
        metric = c.get("metric", "score")
        if metric not in CLAIM_METRICS:
            raise ConfigError(f"{what}.metric", metric, "one of: " + ", ".join(CLAIM_METRICS) + name)
        expect = c.get("expect", "higher")
        if expect not in ("higher", "lower", "within"):
            raise ConfigError(f"{what}.expect", expect, "one of: higher, lower, within" + name)
        margin = c.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise ConfigError(f"{what}.margin", margin, "a number >= 0" + name)
        if expect == "within" and margin <= 0:
            raise ConfigError(f"{what}.margin", margin, "a number > 0 with expect = within" + name)


def _run_one(run: PlannedRun, folder: str) -> dict[str, Any]:
    """Worker-process entry: run (or resume, or report) one experiment."""
    from sparsefl.experiment.runner import run_experiment

    try:
        summary = run_experiment(run.cfg, folder)
    except SparseflError as e:
        return {"error": str(e)}
    return summary


def last_mean(folder: Path, key: str, n: int) -> float | None:
    """The mean of the last ``n`` set values of ``key`` in a run's ``metrics.jsonl`` (None if none)."""
    p = folder / "metrics.jsonl"
    if not p.exists():
        return None
    values = [r[key] for r in map(json.loads, p.read_text().splitlines()) if r.get(key) is not None]
    return statistics.fmean(values[-n:]) if values else None


def result_row(run: PlannedRun, summary: dict[str, Any], folder: Path, score_evals: int = 3) -> dict[str, Any]:
    """One ``results.csv`` row from a run's summary; ``score`` is the mean test accuracy of the
    run's last ``score_evals`` evaluations."""
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
        "score": last_mean(folder, "accuracy", score_evals),
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
        "tuned": point_text(run.point),
        "matrix": run.matrix,
        "warnings": " | ".join(summary.get("warnings") or []),
        "run_dir": str(folder),
    }


def sweep_row(run: PlannedRun, summary: dict[str, Any], folder: Path, score_evals: int = 3) -> dict[str, Any]:
    """One ``sweeps.csv`` row: ``val_score`` is the mean validation accuracy of the global model
    over the run's last ``score_evals`` evaluations (what the choice uses)."""
    return {
        "label": run.label,
        "context": run.context,
        "point": point_text(run.point),
        "seed": run.cfg.seed,
        "val_score": last_mean(folder, "val_accuracy", score_evals),
        "score": last_mean(folder, "accuracy", score_evals),
        "final_accuracy": summary["final_accuracy"],
        "warnings": " | ".join(summary.get("warnings") or []),
        "run_dir": str(folder),
    }


def choose(runs: list[PlannedRun], rows: list[dict[str, Any] | None]) -> tuple[Choices, list[dict[str, Any]]]:
    """Per (label, context), the swept point with the best mean ``val_score`` over its seeds
    (ties: the first listed; a point with no scored run is not a candidate), and a record of
    every candidate for ``tuning.json`` and the report."""
    scores: dict[tuple[str, str], dict[Point, list[float]]] = {}
    for run, row in zip(runs, rows, strict=True):
        per_point = scores.setdefault((run.label, run.context), {})
        values = per_point.setdefault(run.point, [])
        if row is not None and row["val_score"] is not None:
            values.append(float(row["val_score"]))
    chosen: Choices = {}
    record = []
    for (label, context), per_point in scores.items():
        candidates = [(p, statistics.fmean(v), len(v)) for p, v in per_point.items() if v]
        best = max(candidates, key=lambda c: c[1], default=None)  # max keeps the first of equals
        if best is not None:
            chosen[(label, context)] = best[0]
        record.append({
            "label": label,
            "context": context,
            "candidates": [{"point": point_text(p), "val_score": s, "seeds": n} for p, s, n in candidates],
            "chosen": None if best is None else point_text(best[0]),
        })  # fmt: skip
    return chosen, record


def _execute(
    planned: list[PlannedRun],
    out: Path,
    jobs: int,
    on_done: Callable[[PlannedRun, dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    """Run ``planned`` (``jobs`` processes at a time); the summaries in plan order."""
    results: dict[int, dict[str, Any]] = {}

    def collect(i: int, summary: dict[str, Any]) -> None:
        results[i] = summary
        if on_done is not None:
            on_done(planned[i], summary)

    def folder(r: PlannedRun) -> str:
        return str(out / r.subdir / r.folder_name)

    if jobs == 1:
        for i, run in enumerate(planned):
            collect(i, _run_one(run, folder(run)))
    elif planned:
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=exit_with_parent, initargs=(os.getpid(),)
        ) as pool:
            pending = {pool.submit(_run_one, r, folder(r)): i for i, r in enumerate(planned)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    collect(pending.pop(f), f.result())
    return [results[i] for i in range(len(planned))]


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    jobs: int = 1,
    on_done: Callable[[PlannedRun, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Tune the swept labels, then run every planned run (``jobs`` processes at a time); write
    ``sweeps.csv`` and ``tuning.json`` (when the suite sweeps), ``results.csv`` and the report.

    Returns the result rows. A run that fails with a user error is reported in ``failed.txt``
    and left out of the table; the others go on.
    """
    t_start = time.perf_counter()
    out = Path(out)
    suite.plan()  # every config, at every swept point, is valid before any work
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "suite.toml", suite.text)
    errors: list[str] = []

    def rows_of(planned: list[PlannedRun], make: RowFn) -> list[dict[str, Any] | None]:
        """Run ``planned``; a row per run (None for a failed one, whose error is kept)."""
        rows: list[dict[str, Any] | None] = []
        for run, summary in zip(planned, _execute(planned, out, jobs, on_done), strict=True):
            if "error" in summary:
                errors.append(f"{run.subdir}/{run.folder_name}: {summary['error']}")
                rows.append(None)
            else:
                rows.append(make(run, summary, out / run.subdir / run.folder_name, suite.score_evals))
        return rows

    sweeps = suite.sweep_plan()
    tuning: list[dict[str, Any]] = []
    chosen: Choices = {}
    if sweeps:
        sweep_rows = rows_of(sweeps, sweep_row)
        write_results(out / "sweeps.csv", [r for r in sweep_rows if r is not None], SWEEP_COLUMNS)
        chosen, tuning = choose(sweeps, sweep_rows)
        atomic_write_text(out / "tuning.json", json.dumps(tuning, indent=2) + "\n")
        errors += [f"{t['label']} ({t['context']}): no sweep run scored; not run" for t in tuning if not t["chosen"]]
    planned = suite.plan(chosen)
    ordered = [r for r in rows_of(planned, result_row) if r is not None]
    write_results(out / "results.csv", ordered)
    atomic_write_text(out / "failed.txt", "".join(e + "\n" for e in errors))
    from sparsefl.experiment.report import write_report

    write_report(out, suite, ordered, elapsed=time.perf_counter() - t_start, jobs=jobs, tuning=tuning)
    return ordered


def write_results(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...] = RESULT_COLUMNS) -> None:
    """``results.csv`` (or ``sweeps.csv``): one row per run."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns))
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())
