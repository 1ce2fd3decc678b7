"""The benchmark driver: matrix expansion, sweeps, results.csv, report, claims, skip on re-run."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys

import pytest

from sparsefl.errors import ConfigError
from sparsefl.experiment.bench import load_suite, run_suite
from sparsefl.experiment.report import check_claims, paired_verdict, pareto_front, t975

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


def test_a_label_may_have_its_own_seeds(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('seeds = [0, 1]\n[[runs]]\nlabel = "close"\nseeds = [0, 1, 2, 3, 4]\n[[runs]]\nlabel = "other"\n')
    plan = load_suite(str(p)).plan()
    assert [(r.label, r.cfg.seed) for r in plan] == [("close", s) for s in range(5)] + [("other", 0), ("other", 1)]
    p.write_text('[[runs]]\nlabel = "close"\nseeds = [true]\n')
    with pytest.raises(ConfigError, match=r"runs\[close\]\.seeds"):
        load_suite(str(p))
    p.write_text('[[runs]]\nlabel = "x"\n"local.lr" = 0.1\nsweep = {"local.lr" = [0.1, 0.2]}\n')
    with pytest.raises(ConfigError, match=r"runs\[x\]\.sweep\.local\.lr"):
        load_suite(str(p))


def test_builtin_suites_plan(tmp_path):
    assert load_suite("quick").plan()
    suite = load_suite("paper")
    paper, sweeps = suite.plan(), suite.sweep_plan()
    assert len(paper) == 122 and {r.cfg.data.alpha for r in paper} == {0.1, 1.0}
    assert (
        len(sweeps) == 90 and {r.cfg.seed for r in sweeps} == {0} and {r.cfg.data.val_fraction for r in sweeps} == {0.1}
    )
    assert all(r.cfg.data.val_fraction == 0 for r in paper)


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


def test_t_quantiles():
    assert t975(1) == 12.7062 and t975(2) == 4.3027 and t975(30) == 2.0423
    assert abs(t975(31) - 2.0395) < 1e-4 and abs(t975(120) - 1.9799) < 1e-4
    assert t975(31) < t975(30) and abs(t975(10**6) - 1.96) < 1e-3


def test_paired_verdicts_by_hand():
    # d = [0.2, 0.3, 0.4]: mean 0.3, sd 0.1, half-width 4.3027 * 0.1 / sqrt(3) = 0.24841
    v = paired_verdict([0.2, 0.3, 0.4], "higher")
    assert v["n"] == 3 and abs(v["diff"] - 0.3) < 1e-12
    assert abs(v["lo"] - 0.05159) < 1e-5 and abs(v["hi"] - 0.54841) < 1e-5 and v["verdict"] == "holds"
    assert paired_verdict([0.1, 0.2, 0.3], "higher")["verdict"] == "undecided"  # [-0.048, 0.448]
    assert paired_verdict([0.2, 0.3, 0.4], "higher", margin=0.1)["verdict"] == "undecided"
    assert paired_verdict([-0.2, -0.3, -0.4], "higher")["verdict"] == "fails"
    assert paired_verdict([-0.2, -0.3, -0.4], "lower")["verdict"] == "holds"
    assert paired_verdict([0.2, 0.3, 0.4], "lower")["verdict"] == "fails"
    # within 0.05: d = [0.01, -0.01, 0]: interval +-4.3027 * 0.01 / sqrt(3) = +-0.02484
    assert paired_verdict([0.01, -0.01, 0.0], "within", margin=0.05)["verdict"] == "holds"
    assert paired_verdict([0.01, -0.01, 0.0], "within", margin=0.02)["verdict"] == "undecided"
    assert paired_verdict([0.2, 0.3, 0.4], "within", margin=0.05)["verdict"] == "fails"
    one = paired_verdict([0.5], "higher")
    assert one["verdict"] == "undecided: 1 seed" and one["lo"] is None


def test_claims_pair_runs_by_seed_within_a_context():
    def row(label, seed, acc, sparsity=0.9):
        return {"label": label, "seed": seed, "sparsity": sparsity, "partition": "iid", "alpha": "", "score": acc}

    rows = [row("a", 0, 0.80), row("a", 1, 0.90), row("a", 2, 0.70), row("b", 2, 0.60), row("b", 0, 0.70),
            row("b", 1, 0.80), row("b", 0, 0.99, sparsity=0.5)]  # fmt: skip
    claim = {"text": "t", "a": "a", "b": "b", "expect": "higher"}
    (v,) = check_claims((claim,), rows)
    (r,) = v["results"]  # only the same sparsity: b at 0.5 is another context
    assert v["metric"] == "score" and r["n"] == 3 and abs(r["diff"] - 0.1) < 1e-12
    assert r["lo"] == pytest.approx(0.1) and r["verdict"] == "holds"  # every seed gains exactly 0.1
    rows[4]["score"] = 0.85  # seed 0 now loses 0.05: d = [-0.05, 0.1, 0.1]
    (v,) = check_claims((claim,), rows)
    assert v["results"][0]["verdict"] == "undecided"
    (v,) = check_claims(({**claim, "same_sparsity": False},), rows)
    assert len(v["results"]) == 2 and "b at sparsity=0.5" in v["results"][1]["context"]
    assert v["results"][1]["verdict"] == "undecided: 1 seed"
    (v,) = check_claims(({**claim, "b": 0.5},), rows)  # a fixed reference such as chance
    (r,) = v["results"]
    assert r["n"] == 3 and r["b"] == 0.5 and abs(r["diff"] - 0.3) < 1e-12 and r["verdict"] == "holds"


def test_a_claim_naming_a_missing_label_stops_the_suite(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SUITE.replace('b = "lr-small"', 'b = "lr-tiny"'))
    with pytest.raises(ConfigError, match=r"claims\[0\]\.b.*lr-tiny.*a bigger learning rate"):
        load_suite(str(p))
    proc = subprocess.run(
        [sys.executable, "-m", "sparsefl.cli.main", "bench", "--suite", str(p), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "lr-tiny" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    p.write_text(SUITE.replace('expect = "higher"', 'expect = "within"'))
    with pytest.raises(ConfigError, match=r"claims\[0\]\.margin"):
        load_suite(str(p))


SWEPT = """
seeds = [0, 1]
score_evals = 2
[tuning]
val_fraction = 0.2
[base]
"federation.num_clients" = 6
"federation.clients_per_round" = 3
"federation.rounds" = 5
"data.min_samples" = 5
"device" = "cpu"
[[runs]]
label = "tuned"
sweep = {"local.lr" = [1e-7, 0.05]}
[[runs]]
label = "frozen"
"local.lr" = 1e-7
[[claims]]
text = "tuning beats a learning rate that cannot learn"
source = "a test"
comparator = "the same model at lr 1e-7"
budget = "5 rounds"
a = "tuned"
b = "frozen"
"""


def test_sweep_chooses_on_validation_then_runs_the_seeds(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SWEPT)
    suite = load_suite(str(p))
    sweeps = suite.sweep_plan()
    assert [(r.cfg.local.lr, r.cfg.seed, r.cfg.data.val_fraction) for r in sweeps] == [(1e-7, 0, 0.2), (0.05, 0, 0.2)]
    assert len(suite.plan()) == 4
    rows = run_suite(suite, tmp_path / "b", jobs=1)
    tuning = json.loads((tmp_path / "b" / "tuning.json").read_text())
    assert tuning[0]["chosen"] == "local.lr=0.05" and len(tuning[0]["candidates"]) == 2
    with open(tmp_path / "b" / "sweeps.csv") as f:
        sweep_rows = list(csv.DictReader(f))
    assert len(sweep_rows) == 2 and float(sweep_rows[1]["val_score"]) > float(sweep_rows[0]["val_score"])
    tuned = [r for r in rows if r["label"] == "tuned"]
    assert [r["tuned"] for r in tuned] == ["local.lr=0.05"] * 2 and [r["seed"] for r in tuned] == [0, 1]
    for r in rows:  # the score is the mean of the last score_evals (2) test evaluations
        accs = [json.loads(x)["accuracy"] for x in open(f"{r['run_dir']}/metrics.jsonl")]
        assert r["score"] == pytest.approx(statistics.fmean(accs[-2:]))
        assert "val_accuracy" in json.loads(open(f"{r['run_dir']}/metrics.jsonl").readline())
    frozen = [r for r in rows if r["label"] == "frozen"]
    assert all(r["warnings"] == "" for r in tuned) and all("local.lr=1e-07" in r["warnings"] for r in frozen)
    md = (tmp_path / "b" / "report.md").read_text()
    assert "## Tuned values" in md and "local.lr=0.05" in md and "the same model at lr 1e-7" in md
    assert "95% Student t interval" in md and "## Warnings" in md


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.9), (0.5, 0.2), (3.0, 0.8)]
    assert pareto_front(pts) == [(0.5, 0.2), (1.0, 0.5), (3.0, 0.9)]


def test_cli_prints_one_line_per_run_when_not_on_a_terminal(suite_file, tmp_path):
    """Under nohup or CI the progress bar is invisible; each finished run gets a line instead."""
    out = subprocess.run(
        [sys.executable, "-m", "sparsefl.cli.main", "bench", "--suite", str(suite_file), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert [ln.split("]")[0] for ln in lines] == [f"[{i}/6" for i in range(1, 7)]
    assert all("acc=" in ln and "s elapsed" in ln for ln in lines)


def test_claims_pair_runs_within_each_matrix_point(tmp_path):
    """A matrix axis other than sparsity, partition and alpha gives one verdict per point, each
    from the runs of that point paired by seed."""
    (tmp_path / "m.toml").write_text(
        'seeds = [0, 1, 2]\n[matrix]\n"model.width" = [0.5, 1.0]\n'
        '[[runs]]\nlabel = "a"\n"method.name" = "fedavg"\n'
        '[[runs]]\nlabel = "b"\n"method.name" = "fedavg"\n"local.lr" = 0.1\n'
        '[[claims]]\ntext = "a beats b"\na = "a"\nb = "b"\nexpect = "higher"\n'
    )
    suite = load_suite(str(tmp_path / "m.toml"))
    truth = {("a", 0.5): 0.50, ("b", 0.5): 0.40, ("a", 1.0): 0.90, ("b", 1.0): 0.95}
    rows = [
        {
            "label": r.label, "sparsity": r.cfg.method.sparsity, "partition": r.cfg.data.partition,
            "alpha": r.cfg.data.alpha, "matrix": r.matrix, "seed": r.cfg.seed,
            "score": truth[(r.label, r.cfg.model.width)] + 0.001 * r.cfg.seed * (r.label == "a"),
        }
        for r in suite.plan()
    ]  # fmt: skip
    (claim,) = check_claims(suite.claims, rows)
    by_width = {res["context"].split("model.width=")[1]: res for res in claim["results"]}
    assert sorted(by_width) == ["0.5", "1.0"]
    assert by_width["0.5"]["n"] == 3 and by_width["0.5"]["verdict"] == "holds"
    assert by_width["1.0"]["n"] == 3 and by_width["1.0"]["verdict"] == "fails"
