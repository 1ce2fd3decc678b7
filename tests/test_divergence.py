"""Divergence is never silent: the stalled-loss rule (hand-made losses) and a run driven into it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from sparsefl.config import load_config
from sparsefl.experiment.runner import run_experiment
from sparsefl.methods.base import Method
from sparsefl.runtime.divergence import divergence_warning, round_train_loss, stalled

LN10 = math.log(10)


def test_round_train_loss_weights_clients_by_samples():
    clients = [{"loss": 1.0, "num_examples": 10}, {"loss": 2.0, "num_examples": 30}, {"loss": None}]
    assert round_train_loss(clients) == 1.75
    assert round_train_loss([]) is None


def test_stalled_is_within_ten_percent_of_chance_or_above():
    assert stalled(0.91 * LN10, 10) and stalled(5.0, 10) and stalled(float("nan"), 10)
    assert not stalled(0.89 * LN10, 10) and not stalled(None, 10)


def test_warning_once_when_the_streak_reaches_three_rounds():
    losses = [2.30, 2.31, 2.29]
    w = divergence_warning(losses, 10, 0.05, rounds=3)
    assert w is not None
    assert "ln(10)=2.30" in w and "3 rounds" in w and "rounds 1-3" in w and "local.lr=0.05" in w
    assert divergence_warning(losses[:2], 10, 0.05, rounds=3) is None  # too early
    assert divergence_warning([*losses, 2.30], 10, 0.05, rounds=3) is None  # the same streak: warned already
    assert divergence_warning([1.0, 2.3, 2.3, 2.3], 10, 0.05, rounds=3) is not None  # a streak from round 2
    assert divergence_warning([2.3, 2.3, 1.5], 10, 0.05, rounds=3) is None  # learning now
    assert divergence_warning([2.3, 1.2, 0.9, 0.7], 10, 0.05, rounds=3) is None


def test_a_run_that_does_not_learn_is_warned_in_progress_metrics_and_summary(tmp_path):
    out = tmp_path / "run"
    sets = ["local.lr=1e-7", "federation.num_clients=6", "federation.clients_per_round=3",
            "federation.rounds=6", "data.min_samples=5", "device=cpu"]  # fmt: skip
    args = [sys.executable, "-m", "sparsefl.cli.main", "run", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    printed = " ".join((proc.stdout + proc.stderr).split())
    assert "training loss has stayed at or above chance" in printed and "local.lr=1e-07" in printed
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["warning"] is not None for r in records] == [False, False, False, False, True, False]
    assert "rounds 1-5" in records[4]["warning"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] == [f"round 5: {records[4]['warning']}"]


def test_a_slow_start_or_a_falling_distillation_loss_is_not_warned():
    # a static mask learning slowly near chance, and KD's loss (not cross-entropy) above ln 10
    assert divergence_warning([2.22, 2.26, 2.12], 10, 0.05, rounds=3) is None
    assert divergence_warning([8.23, 7.16, 3.42], 10, 0.05, rounds=3) is None
    # a slow start over 10-step rounds falls too, over the default five rounds
    assert divergence_warning([2.20, 2.16, 2.17, 2.08, 1.98], 10, 0.05) is None
    # at chance with no progress (a learning rate far too small), or NaN: warned
    assert divergence_warning([2.3026, 2.3025, 2.3024, 2.3024, 2.3023], 10, 1e-6) is not None
    assert divergence_warning([2.4, *[float("nan")] * 4], 10, 100.0) is not None


def test_a_loss_that_is_not_cross_entropy_is_not_checked(tmp_path, monkeypatch):
    # the run above, as a method whose loss adds other terms (KD) would train it: no warning
    monkeypatch.setattr(Method, "loss_is_cross_entropy", property(lambda self: False))
    sets = ["local.lr=1e-7", "federation.num_clients=6", "federation.clients_per_round=3",
            "federation.rounds=6", "data.min_samples=5", "device=cpu"]  # fmt: skip
    summary = run_experiment(load_config(overrides=sets), tmp_path / "run")
    assert summary["warnings"] == []
    assert all(json.loads(x)["warning"] is None for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
