"""The benchmark report: ``report.md`` and ``report.html`` with mean +- std over seeds, PNG plots,
the values tuning chose, and a verdict for each literature claim the suite lists.

A claim (``[[claims]]`` in the suite) compares two run labels on one metric:

```toml
[[claims]]
text = "ZeroFL (Diff. on Top-K-Weights, r_mask 0.2) beats SWAT with dense uploads"
source = "ZeroFL (ICLR 2022), Table 1, Speech Commands, 90%: +2.3 points"
comparator = "SWAT with dense uploads, same sparsity and budget"
budget = "20 rounds x 10 clients x 10 local steps"
a = "zerofl-diff-r0.2"      # the label the claim is about
b = "swat-dense"            # the label it is compared with, or a number (e.g. chance, 0.1)
metric = "score"            # any numeric results.csv column (default: score)
expect = "higher"           # "lower" (e.g. uplink_bytes) or "within" (needs margin)
margin = 0.0                # higher: a - b > margin; lower: a - b < -margin; within: |a - b| <= margin
```

It is checked in every context (sparsity x partition x alpha; ``same_sparsity = false`` pairs a
with b at any sparsity) where both labels ran. The rule: runs are paired by seed; with ``n``
pairs the paired differences ``d = a - b`` give the 95% Student t interval
``mean(d) +- t(0.975, n - 1) * sd(d) / sqrt(n)``. The claim *holds* when the whole interval lies
on the claimed side (``higher``: above ``margin``; ``lower``: below ``-margin``; ``within``:
inside ``[-margin, margin]``), *fails* when it lies wholly on the other side (``higher``: below
``margin``; ``lower``: above ``-margin``; ``within``: wholly outside), and is *undecided*
otherwise; one pair gives no interval ("undecided: 1 seed").

Also here, for single runs: ``metrics.csv`` (:func:`write_metrics_csv`) and the side-by-side
table of ``sparsefl show A B ...`` (:func:`compare_runs`).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsefl.config import flatten
from sparsefl.experiment.plots import log_ticks, tick_label
from sparsefl.state import atomic_write_text

if TYPE_CHECKING:
    from rich.table import Table

GroupKey = tuple[str, float, str, Any, str]


def _key(r: dict[str, Any]) -> GroupKey:
    """(label, sparsity, partition, alpha, the suite's other matrix values): runs of one key
    differ only by seed."""
    return (r["label"], float(r["sparsity"]), r["partition"], r["alpha"], r.get("matrix") or "")


def _ctx(k: GroupKey) -> str:
    _, sp, part, alpha, matrix = k
    a = f" alpha={alpha}" if alpha not in ("", None) else ""
    return f"sparsity={sp:g} {part}{a}" + (f" {matrix}" if matrix else "")


def _ms(values: list[float]) -> tuple[float, float]:
    vals = [float(v) for v in values if v not in (None, "")]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def group(rows: list[dict[str, Any]]) -> dict[GroupKey, list[dict[str, Any]]]:
    """Rows grouped by (label, sparsity, partition, alpha), in first-seen order."""
    g: dict[GroupKey, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        g[_key(r)].append(r)
    return dict(g)


def summary_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (mean +- std over seeds)."""
    head = ["label", "method", "sparsity", "partition", "seeds", "score", "final acc", "best acc", "uplink MB",
            "downlink MB", "train GFLOP (vs dense)", "client s", "wall s", "tuned"]  # fmt: skip
    out = []
    for k, rs in group(rows).items():
        sc, ss = _ms([r.get("score") for r in rs])
        fa, fs = _ms([r["final_accuracy"] for r in rs])
        ba, bs = _ms([r["best_accuracy"] for r in rs])
        up, _ = _ms([r["uplink_bytes"] for r in rs])
        dn, _ = _ms([r["downlink_bytes"] for r in rs])
        fl, _ = _ms([r["train_flops"] for r in rs])
        fd, _ = _ms([r["train_flops_dense"] for r in rs])
        cs, _ = _ms([r["client_seconds"] for r in rs])
        ws, _ = _ms([r["wall_seconds"] for r in rs])
        part = rs[0]["partition"] + (f" a={rs[0]['alpha']}" if rs[0]["alpha"] not in ("", None) else "")
        out.append([
            k[0], rs[0]["method"], f"{k[1]:g}", part, str(len(rs)), f"{sc:.4f} ± {ss:.4f}", f"{fa:.4f} ± {fs:.4f}",
            f"{ba:.4f} ± {bs:.4f}", f"{up / 1e6:.2f}", f"{dn / 1e6:.2f}",
            f"{fl / 1e9:.2f} ({fl / fd:.3f})" if fd else "-", f"{cs:.1f}", f"{ws:.1f}",
            "; ".join(dict.fromkeys(str(r.get("tuned") or "") for r in rs if r.get("tuned"))) or "-",
        ])  # fmt: skip
    return head, out


#: Student t quantiles t(0.975, df) for df = 1..30; beyond, a Cornish-Fisher expansion.
T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
    2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
    2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(T975):
        return T975[df - 1]
    # Cornish-Fisher expansion of t around the normal quantile z: exact to 1e-5 from df = 31
    z = 1.959963984540054
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def paired_verdict(diffs: list[float], expect: str, margin: float = 0.0) -> dict[str, Any]:
    """The verdict on paired differences ``a - b`` (see the module docstring): ``n``, ``diff``
    (their mean), ``lo`` and ``hi`` (the 95% t interval; None for one pair) and ``verdict``."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    if n < 2:
        verdict = "undecided: 1 seed" if n else "not measured: no seed ran both"
        return {"n": n, "diff": mean, "lo": None, "hi": None, "verdict": verdict}
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if expect == "higher":
        verdict = "holds" if lo > margin else "fails" if hi < margin else "undecided"
    elif expect == "lower":
        verdict = "holds" if hi < -margin else "fails" if lo > -margin else "undecided"
    else:  # within
        verdict = "holds" if -margin <= lo and hi <= margin else "fails" if lo > margin or hi < -margin else "undecided"
    return {"n": n, "diff": mean, "lo": lo, "hi": hi, "verdict": verdict}


def check_claims(claims: tuple[dict[str, Any], ...], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim's verdict per context where both labels ran, from runs paired by seed."""
    groups = group(rows)
    verdicts = []
    for c in claims:
        metric, expect = c.get("metric", "score"), c.get("expect", "higher")
        margin = float(c.get("margin", 0.0))
        found = []
        for ka, ra in groups.items():
            if ka[0] != c["a"]:
                continue
            if not isinstance(c["b"], str):  # a fixed reference (e.g. chance): every seed pairs with it
                pairs = [(float(r[metric]), float(c["b"])) for r in ra if r.get(metric) not in (None, "")]
                ma = statistics.fmean(p[0] for p in pairs) if pairs else math.nan
                v = paired_verdict([x - y for x, y in pairs], expect, margin)
                found.append({"context": _ctx(ka), "a": ma, "b": float(c["b"]), **v})
                continue
            for kb, rb in groups.items():
                if kb[0] != c["b"]:
                    continue
                same_sp = c.get("same_sparsity", True)
                if kb[2:] != ka[2:] or (same_sp and kb[1] != ka[1]):
                    continue
                by_seed = {r.get("seed"): r[metric] for r in rb if r.get(metric) not in (None, "")}
                pairs = [(float(r[metric]), float(by_seed[r.get("seed")])) for r in ra
                         if r.get(metric) not in (None, "") and r.get("seed") in by_seed]  # fmt: skip
                ma = statistics.fmean(p[0] for p in pairs) if pairs else math.nan
                mb = statistics.fmean(p[1] for p in pairs) if pairs else math.nan
                v = paired_verdict([x - y for x, y in pairs], expect, margin)
                ctx = _ctx(ka) + ("" if kb[1] == ka[1] else f" (b at sparsity={kb[1]:g})")
                found.append({"context": ctx, "a": ma, "b": mb, **v})
        verdicts.append({**c, "metric": metric, "expect": expect, "margin": margin, "results": found})
    return verdicts


def _series(run_dir: str) -> list[dict[str, Any]]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def plots(out: Path, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The report's PNG plots; returns (file name, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    made: list[tuple[str, str]] = []
    labels = list(dict.fromkeys(k[0] for k in groups))
    colors = [plt.get_cmap("tab20")(i % 20) for i in range(len(groups))]
    label_color = {lab: plt.get_cmap("tab20")(i % 20) for i, lab in enumerate(labels)}
    sparsities = sorted({k[1] for k in groups})
    styles = ["-", "--", ":", "-."]
    # one panel per partition (e.g. Dirichlet alpha 0.1 and 1.0); in a panel a colour per label
    # and a line style per sparsity, so 50 curves stay readable
    panels = list(dict.fromkeys(k[2:] for k in groups))

    def panel_title(ctx: tuple[Any, ...]) -> str:
        return f"{ctx[0]}" + ("" if ctx[1] in ("", None) else f" alpha={ctx[1]}") + (f" {ctx[2]}" if ctx[2] else "")

    def legend_name(k: GroupKey) -> str:
        """The label, with its sparsity when the label ran at several."""
        several = len({g[1] for g in groups if g[0] == k[0]}) > 1
        return f"{k[0]} ({k[1]:g})" if several else k[0]

    def curves(xkey: str, ctx: tuple[Any, ...]) -> dict[GroupKey, tuple[list[float], list[float]]]:
        res = {}
        for k, rs in groups.items():
            if k[2:] != ctx:
                continue
            per_seed = []
            for r in rs:
                cum_up = cum_fl = 0.0
                pts = []
                for m in _series(r["run_dir"]):
                    cum_up += m["uplink_bytes"]
                    cum_fl += m["train_flops"]
                    if m["accuracy"] is not None:
                        x = {"round": m["round"], "uplink": cum_up / 1e6, "flops": cum_fl / 1e9}[xkey]
                        pts.append((x, m["accuracy"]))
                per_seed.append(pts)
            n = min((len(p) for p in per_seed), default=0)
            if n:
                xs = [statistics.fmean(p[i][0] for p in per_seed) for i in range(n)]
                ys = [statistics.fmean(p[i][1] for p in per_seed) for i in range(n)]
                res[k] = (xs, ys)
        return res

    for name, xkey, xlabel, caption in (
        ("accuracy_vs_round.png", "round", "round", "Global test accuracy per round (mean over seeds)"),
        ("accuracy_vs_uplink.png", "uplink", "cumulative uplink (MB)", "Accuracy against cumulative uplink bytes"),
        ("accuracy_vs_flops.png", "flops", "cumulative training GFLOP", "Accuracy against training FLOPs"),
    ):
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.6), sharey=True, squeeze=False)
        for ax, ctx in zip(axes[0], panels):
            for k, (xs, ys) in curves(xkey, ctx).items():
                style = styles[sparsities.index(k[1]) % len(styles)]
                ax.plot(xs, ys, style, label=legend_name(k), lw=1.3, color=label_color[k[0]], marker=".", ms=3)
            ax.set_xlabel(xlabel)
            if len(panels) > 1:
                ax.set_title(panel_title(ctx), fontsize=9)
            if xkey != "round":
                log_axis(ax, [x for xs, _ in curves(xkey, ctx).values() for x in xs])
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test accuracy")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append((name, caption))

    fig, ax = plt.subplots(figsize=(6, 4))
    by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for k, rs in groups.items():
        where = f"{k[2]}{'' if k[3] in ('', None) else ' a=' + str(k[3])}{' ' + k[4] if k[4] else ''}"
        by_label[f"{k[0]} ({where})"].append((k[1], _ms([r["final_accuracy"] for r in rs])[0]))
    for i, (lab, pts) in enumerate(by_label.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab, color=colors[i % len(colors)])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("final accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out / "accuracy_vs_sparsity.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    made.append(("accuracy_vs_sparsity.png", "Final accuracy against sparsity"))

    pts = [(_ms([r["uplink_bytes"] for r in rs])[0] / 1e6, _ms([r["final_accuracy"] for r in rs])[0], k)
           for k, rs in groups.items()]  # fmt: skip
    front = pareto_front([(p[0], p[1]) for p in pts])
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (x, y, k) in enumerate(pts):
        ax.scatter(x, y, s=18, color=colors[i])
        ax.annotate(k[0], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, label="Pareto front")
        ax.legend(fontsize=7)
    log_axis(ax, [p[0] for p in pts])
    ax.set_xlabel("total uplink (MB)")
    ax.set_ylabel("final accuracy")
    ax.grid(alpha=0.3)
    fig.savefig(out / "pareto_uplink.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    made.append(("pareto_uplink.png", "Accuracy against uplink bytes: the Pareto front"))
    return made


def log_axis(ax: Any, values: list[float]) -> None:
    """A log x axis with :func:`~sparsefl.experiment.plots.log_ticks` labels and unlabelled minor
    ticks: matplotlib labels minor ticks on a range under a decade, and they overlap."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    positive = [v for v in values if v > 0]
    if not positive:
        return
    ticks = log_ticks(min(positive), max(positive))
    ax.set_xticks(ticks, [tick_label(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by any other (less cost and at least as much accuracy), by cost."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _expected(v: dict[str, Any]) -> str:
    """A claim's expectation in words: ``a higher than b``, ``a within 0.05 of b``."""
    by = f" by more than {v['margin']:g}" if v["margin"] and v["expect"] != "within" else ""
    if v["expect"] == "within":
        return f"{v['a']} within {v['margin']:g} of {v['b']}"
    return f"{v['a']} {v['expect']} than {v['b']}{by}"


def claim_table(verdicts: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the claims table: one row per claim and context."""
    head = ["claim", "source", "comparator", "budget", "context", "metric", "expected", "seeds", "a", "b",
            "a - b [95% CI]", "verdict"]  # fmt: skip
    rows = []
    for v in verdicts:
        common = [v["text"], v.get("source", ""), v.get("comparator", ""), v.get("budget", "")]
        if not v["results"]:
            rows.append([*common, "-", v["metric"], _expected(v), "0", "-", "-", "-", "not measured (no runs of both)"])
        for r in v["results"]:
            ci = "" if r["lo"] is None else f" [{r['lo']:+.4g}, {r['hi']:+.4g}]"
            rows.append([*common, r["context"], v["metric"], _expected(v), str(r["n"]), f"{r['a']:.4g}",
                         f"{r['b']:.4g}", f"{r['diff']:+.4g}{ci}", r["verdict"]])  # fmt: skip
    return head, rows


def tuning_table(tuning: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the tuning table: every candidate's validation score and the choice."""
    head = ["label", "context", "candidates (mean validation score)", "chosen"]
    rows = []
    for t in tuning:
        cands = "; ".join(f"{c['point']}: {c['val_score']:.4f}" for c in t["candidates"]) or "-"
        rows.append([t["label"], t["context"] or "-", cands, t["chosen"] or "none (no sweep run scored)"])
    return head, rows


RULES = """Each run's **score** is the mean test accuracy of its last {k} evaluations. A claim is
checked per context on runs paired by seed: the 95% Student t interval of the mean paired
difference (a - b) decides. It *holds* when the whole interval lies on the claimed side
(beyond the claim's margin), *fails* when it lies wholly on the other side, and is *undecided*
otherwise; one seed gives no interval. Swept keys were tuned on a validation split of the
clients' data ({vf:g} of each client's samples, seeds {ts}), never on the test set: the value with
the best mean validation score of the global model over the last {k} evaluations was kept."""


def write_report(
    out: Path,
    suite: Any,
    rows: list[dict[str, Any]],
    elapsed: float | None = None,
    jobs: int | None = None,
    tuning: list[dict[str, Any]] | None = None,
) -> None:
    """Write report.md, report.html and the plots into ``out`` (``elapsed``: seconds this
    invocation of the suite took, with ``jobs`` processes; runs finished earlier were skipped;
    ``tuning``: the choices of :func:`~sparsefl.experiment.bench.choose`)."""
    import datetime
    import os
    import platform

    import torch

    head, table = summary_table(rows)
    made = plots(out, rows) if rows else []
    claim_head, claim_rows = claim_table(check_claims(suite.claims, rows))
    tune_head, tune_rows = tuning_table(tuning or [])
    warned = [[r["label"], f"seed {r['seed']}", str(r["warnings"])] for r in rows if r.get("warnings")]
    rules = RULES.format(
        k=getattr(suite, "score_evals", 3),
        vf=getattr(suite, "val_fraction", 0.1),
        ts=", ".join(str(x) for x in getattr(suite, "tuning_seeds", ())) or "-",
    )
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    took = ""
    if elapsed is not None:
        took = f" This invocation took {elapsed / 60:.1f} min with --jobs {jobs} (a rerun skips finished runs)."
    run_s = sum(float(r.get("wall_seconds") or 0) for r in rows)
    md = [
        f"# sparsefl benchmark: {suite.name}",
        "",
        suite.description.strip(),
        "",
        f"Written {when}. Machine: {machine}. Runs: {len(rows)}, {run_s / 3600:.2f} h of run wall time "
        f"in all.{took} Mean ± standard deviation over seeds.",
        "",
        _md_table(head, table),
        "",
        "## Claims from the literature, checked against these runs",
        "",
        rules,
        "",
        _md_table(claim_head, claim_rows) if claim_rows else "(the suite lists no claims)",
        "",
        "## Tuned values",
        "",
        _md_table(tune_head, tune_rows) if tune_rows else "(the suite tunes nothing)",
        "",
        "## Warnings",
        "",
        _md_table(["label", "seed", "warning"], warned) if warned else "(no run warned)",
        "",
        "## Plots",
        "",
        *[f"![{cap}]({name})\n\n{cap}\n" for name, cap in made],
        "## Suite",
        "",
        "```toml",
        suite.text.strip(),
        "```",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    css = "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;font-size:13px}" \
          "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}"  # fmt: skip
    body = [
        f"<h1>sparsefl benchmark: {html.escape(suite.name)}</h1>",
        f"<p>{html.escape(suite.description.strip())}</p>",
        f"<p>Written {when}. Machine: {html.escape(machine)}. Runs: {len(rows)}, {run_s / 3600:.2f} h of run "
        f"wall time in all.{html.escape(took)} Mean ± standard deviation over seeds.</p>",
        _html_table(head, table),
        "<h2>Claims from the literature, checked against these runs</h2>",
        f"<p>{html.escape(rules)}</p>",
        _html_table(claim_head, claim_rows) if claim_rows else "<p>(none)</p>",
        "<h2>Tuned values</h2>",
        _html_table(tune_head, tune_rows) if tune_rows else "<p>(none)</p>",
        "<h2>Warnings</h2>",
        _html_table(["label", "seed", "warning"], warned) if warned else "<p>(none)</p>",
        "<h2>Plots</h2>",
        *[f'<figure><img src="{name}"><figcaption>{html.escape(cap)}</figcaption></figure>' for name, cap in made],
        f"<h2>Suite</h2><pre>{html.escape(suite.text)}</pre>",
    ]
    atomic_write_text(out / "report.html", f"<!doctype html><meta charset=utf-8><style>{css}</style>" + "".join(body))


def metrics_csv(records: list[dict[str, Any]]) -> str:
    """``metrics.csv`` text: one row per round, a column per scalar field of the records in
    their order; the per-client and failure lists become counts (``num_clients``,
    ``num_failures``); an unset value (no evaluation that round) is an empty cell."""
    columns: dict[str, None] = {}
    rows = []
    for r in records:
        row: dict[str, Any] = {}
        for k, v in r.items():
            if isinstance(v, list):
                k, v = f"num_{k}", len(v)
            elif isinstance(v, dict):
                continue
            row[k] = "" if v is None else v
            columns.setdefault(k)
        rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_metrics_csv(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write :func:`metrics_csv` of ``records`` atomically (a spreadsheet's view of metrics.jsonl)."""
    atomic_write_text(path, metrics_csv(records))


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
    """A run's configuration as dotted keys, without the run folder's own ``_`` fields."""
    return {k: v for k, v in flatten(tree).items() if not k.rsplit(".", 1)[-1].startswith("_")}


def _run_facts(folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A run folder's flattened configuration and its results as table cells (from summary.json,
    or from metrics.jsonl while it runs)."""
    from sparsefl.experiment.runfolder import RunFolder

    rf = RunFolder(folder)
    cfg = rf.run_config()
    records = rf.read_metrics()
    summary = rf.read_summary()
    rounds = _flat(cfg).get("federation.rounds")
    accs = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    s = summary or {
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "rounds": len(records),
        **{f"{k}_total": sum(r.get(k) or 0 for r in records) for k in
           ("uplink_bytes", "downlink_bytes", "train_flops", "train_flops_dense", "client_seconds")},
        "failures_total": sum(len(r.get("failures", [])) for r in records),
    }  # fmt: skip

    def fmt(key: str, f: Any) -> str:
        v = s.get(key)
        return "-" if v is None else f(v)

    flops, dense = s.get("train_flops_total"), s.get("train_flops_dense_total")
    cells = {
        "status": "finished" if summary else f"running or interrupted ({len(records)}/{rounds} rounds)",
        "final accuracy": fmt("final_accuracy", lambda v: f"{v:.4f}"),
        "best accuracy": fmt("best_accuracy", lambda v: f"{v:.4f}"),
        "rounds": fmt("rounds", str),
        "density": fmt("density", lambda v: f"{v:.4f}"),
        "uplink MB": fmt("uplink_bytes_total", lambda v: f"{v / 1e6:.2f}"),
        "downlink MB": fmt("downlink_bytes_total", lambda v: f"{v / 1e6:.2f}"),
        "train GFLOP": fmt("train_flops_total", lambda v: f"{v / 1e9:.3f}"),
        "vs dense FLOPs": f"{flops / dense:.3f}" if flops is not None and dense else "-",
        "client s": fmt("client_seconds_total", lambda v: f"{v:.1f}"),
        "wall s": fmt("wall_seconds", lambda v: f"{v:.1f}"),
        "failures": fmt("failures_total", str),
        "model_sha256": fmt("model_sha256", str),
    }
    flat = _flat(cfg)
    if isinstance(cfg.get("_model"), dict):  # a user module: its class, not the default model name
        flat["model.name"] = cfg["_model"].get("class", flat.get("model.name"))
    return flat, cells


#: Configuration keys every comparison shows; any other key is shown where the runs differ.
COMPARED_KEYS = ("method.name", "data.name", "model.name", "federation.num_clients", "seed")


def compare_rows(folders: Sequence[str | Path]) -> tuple[list[str], list[list[str]]]:
    """Header (``""`` then each folder) and rows of :func:`compare_runs`: the main configuration
    keys, every other key whose value differs between the runs (``-`` where a run's method has
    no such option), then status and results."""
    facts = [_run_facts(Path(f)) for f in folders]
    keys = list(COMPARED_KEYS)
    for cfg, _ in facts:
        keys += [k for k in cfg if k not in keys]
    rows = []
    for k in keys:
        values = [cfg.get(k, "-") for cfg, _ in facts]
        if k in COMPARED_KEYS or any(v != values[0] for v in values):
            rows.append([k, *(v if isinstance(v, str) else json.dumps(v) for v in values)])
    for name in facts[0][1]:
        rows.append([name, *(cells[name] for _, cells in facts)])
    return ["", *(str(f) for f in folders)], rows


def compare_runs(folders: Sequence[str | Path]) -> Table:
    """Run folders side by side (``sparsefl show A B ...``): a column per run, a row per
    configuration key that tells them apart and per result; a run still going shows its
    rounds so far. A folder that is not a run folder: RunFolderError."""
    from rich.table import Table

    head, rows = compare_rows(folders)
    t = Table(title=f"{len(folders)} runs side by side", header_style="bold")
    t.add_column(head[0])
    for h in head[1:]:
        t.add_column(h, justify="right")
    for r in rows:
        t.add_row(*r)
    return t
