"""The benchmark driver: matrix expansion, results.csv, report, claims, skip on re-run."""

from __future__ import annotations

import csv

import pytest

from sparsefl.errors import ConfigError
from sparsefl.experiment.bench import load_suite, run_suite
from sparsefl.experiment.report import check_claims, pareto_front

SUITE = """
description = "tiny test suite"
seeds = [0, 1]
[base]
"federation.num_clients" = 4
"federation.clients_per_round" = 2
"federation.rounds" = 2
"data.min_samples" = 5
[[runs]]
label = "lr-small"
"local.lr" = 0.01
[[runs]]
label = "lr-big"
"local.lr" = [0.05, 0.1]
[matrix]
"data.partition" = ["iid"]
[[claims]]
text = "a bigger learning rate learns faster here"
a = "lr-big"
b = "lr-small"
metric = "final_accuracy"
expect = "higher"
same_sparsity = true
"""


@pytest.fixture
def suite_file(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SUITE)
    return p


def test_plan_expands_lists_matrix_and_seeds(suite_file):
    plan = load_suite(str(suite_file)).plan()
    assert len(plan) == (1 + 2) * 2
    assert {r.cfg.local.lr for r in plan} == {0.01, 0.05, 0.1}
    assert all(r.cfg.data.partition == "iid" for r in plan)
    assert len({r.folder_name for r in plan}) == len(plan)


def test_bad_suite_is_rejected_before_any_work(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('seeds=[0]\n[[runs]]\nlabel="x"\n"data.alpha"=-1\n')
    with pytest.raises(ConfigError, match="data.alpha"):
        load_suite(str(p)).plan()
    with pytest.raises(ConfigError, match="--suite"):
        load_suite(str(tmp_path / "missing.toml"))


def test_builtin_suites_plan(tmp_path):
    assert load_suite("quick").plan()
    paper = load_suite("paper").plan()
    assert len(paper) == 150 and {r.cfg.data.alpha for r in paper} == {0.1, 1.0}


def test_run_suite_writes_results_report_and_skips_finished(tmp_path, suite_file):
    suite = load_suite(str(suite_file))
    seen = []
    rows = run_suite(suite, tmp_path / "b", jobs=2, on_done=lambda r, s: seen.append(s.get("status")))
    assert len(rows) == 6 and seen.count("completed") == 6
    with open(tmp_path / "b" / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 6 and float(csv_rows[0]["uplink_bytes"]) > 0
    for name in (
        "report.md",
        "report.html",
        "accuracy_vs_round.png",
        "accuracy_vs_uplink.png",
        "accuracy_vs_flops.png",
        "accuracy_vs_sparsity.png",
        "pareto_uplink.png",
    ):
        assert (tmp_path / "b" / name).stat().st_size > 0, name
    md = (tmp_path / "b" / "report.md").read_text()
    assert "a bigger learning rate learns faster here" in md and "± " in md
    seen.clear()
    again = run_suite(suite, tmp_path / "b", jobs=1, on_done=lambda r, s: seen.append(s.get("status")))
    assert seen == ["finished"] * 6
    assert [r["model_sha256"] for r in again] == [r["model_sha256"] for r in rows]


def test_claim_verdicts_oracle():
    rows = [
        {"label": "a", "sparsity": 0.9, "partition": "iid", "alpha": "", "final_accuracy": 0.8},
        {"label": "a", "sparsity": 0.9, "partition": "iid", "alpha": "", "final_accuracy": 0.9},
        {"label": "b", "sparsity": 0.9, "partition": "iid", "alpha": "", "final_accuracy": 0.7},
        {"label": "b", "sparsity": 0.5, "partition": "iid", "alpha": "", "final_accuracy": 0.99},
    ]
    (v,) = check_claims(({"text": "t", "a": "a", "b": "b", "metric": "final_accuracy", "expect": "higher"},), rows)
    assert len(v["results"]) == 1
    r = v["results"][0]
    assert r["reproduced"] and abs(r["a"] - 0.85) < 1e-12 and r["b"] == 0.7
    assert r["clear"]  # a gap of 0.15 against a spread of 0.07
    rows[2]["final_accuracy"] = 0.8  # now b is 0.8 and a 0.85 +- 0.07: the gap is within the spread
    (v,) = check_claims(({"text": "t", "a": "a", "b": "b", "metric": "final_accuracy", "expect": "higher"},), rows)
    assert v["results"][0]["reproduced"] and not v["results"][0]["clear"]


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (0.5, 0.2), (3.0, 0.8)]
    assert pareto_front(pts) == [(0.5, 0.2), (1.0, 0.5), (3.0, 0.9)]


def test_cli_prints_one_line_per_run_when_not_on_a_terminal(suite_file, tmp_path):
    """Under nohup or CI the progress bar is invisible; each finished run gets a line instead."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "sparsefl.cli.main", "bench", "--suite", str(suite_file), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in lines] == [f"[{i}/6" for i in range(1, 7)]
    assert all("acc=" in ln and "s elapsed" in ln for ln in lines)
