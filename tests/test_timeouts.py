"""``federation.client_timeout`` is enforced while clients run: a client past its deadline is
abandoned (its worker process killed and replaced) and recorded as a ``timeout`` failure, and
the run goes on; a run in which no client is late has the bits of the run without a timeout."""

from __future__ import annotations

import json
import os
import time
import warnings

import pytest
import torch
from torch import nn

import sparsefl.engines.embedded as embedded
from sparsefl.config import load_config
from sparsefl.experiment.runner import run_experiment
from sparsefl.orphans import alive
from sparsefl.protocol.sampling import sample_clients

TINY = [
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=3",
    "data.min_samples=5",
]
TIMEOUT = 1.5


def _rows(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _hang_in_round_2(monkeypatch, hung):
    """Make round 2's first sampled client hang (the patch reaches the workers forked from this
    process; their replacements, from the fork server, run the real code); it writes the pid
    of the process it hangs in to ``hung``. Returns the client's id."""
    victim = sample_clients(0, 2, 6, 3, 0)[0]
    real = embedded.execute_task

    def hang(method, data, task, state):
        if task.round == 2 and task.client_id == victim:
            hung.write_text(str(os.getpid()))
            time.sleep(600)
        return real(method, data, task, state)

    monkeypatch.setattr(embedded, "execute_task", hang)
    return victim


def _check_abandoned(folder, victim):
    rows = _rows(folder)
    assert [r["round"] for r in rows] == [1, 2, 3]
    (fail,) = rows[1]["failures"]
    assert fail["client"] == victim and fail["injected"] is None
    assert fail["reason"].startswith("timeout:") and f"client_timeout={TIMEOUT:g} s" in fail["reason"]
    assert victim not in [c["id"] for c in rows[1]["clients"]] and len(rows[1]["clients"]) == 2
    assert TIMEOUT <= rows[1]["round_seconds"] < TIMEOUT + 5
    assert not rows[0]["failures"] and not rows[2]["failures"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_hanging_client_is_abandoned_at_its_deadline(tmp_path, monkeypatch, jobs):
    """Round 2 ends about ``TIMEOUT`` seconds after the hanging client started, without it; its
    worker is gone; rounds 1 and 3 are untouched."""
    victim = _hang_in_round_2(monkeypatch, tmp_path / "hung.pid")
    cfg = load_config(overrides=[*TINY, f"jobs={jobs}", f"federation.client_timeout={TIMEOUT}"])
    s = run_experiment(cfg, tmp_path / "r")
    assert s["status"] == "completed" and s["failures_total"] == 1
    _check_abandoned(tmp_path / "r", victim)
    assert not alive(int((tmp_path / "hung.pid").read_text())), "the worker running the late client was killed"


def test_with_no_client_late_a_timeout_keeps_the_bits(tmp_path):
    base = run_experiment(load_config(overrides=TINY), tmp_path / "base")
    for jobs in (1, 2):
        cfg = load_config(overrides=[*TINY, f"jobs={jobs}", "federation.client_timeout=60"])
        s = run_experiment(cfg, tmp_path / f"jobs{jobs}")
        assert s["model_sha256"] == base["model_sha256"] and s["failures_total"] == 0


def test_without_workers_clients_run_here_with_a_warning(tmp_path, monkeypatch):
    """A model class defined in a function cannot be pickled for the fork server: the timeout
    falls back to the check after each client, with a warning, and the same bits."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x):
            return self.body(x)

    monkeypatch.setattr(embedded, "forks", lambda threads: False)
    base = run_experiment(load_config(overrides=TINY), tmp_path / "base", model=Net())
    cfg = load_config(overrides=[*TINY, "federation.client_timeout=60"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = run_experiment(cfg, tmp_path / "t", model=Net())
    assert any("client_timeout: worker processes could not start" in str(w.message) for w in caught)
    assert s["model_sha256"] == base["model_sha256"] and s["failures_total"] == 0


def test_a_replacement_that_cannot_start_leaves_the_round_to_this_process(tmp_path, monkeypatch):
    """The first workers are forked (a local model class is no obstacle), but the replacement
    of the late client's worker cannot be pickled for the fork server: a warning, the late
    client stays a timeout failure (not rerun here), the other clients run in this process."""
    victim = _hang_in_round_2(monkeypatch, tmp_path / "hung.pid")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x):
            return self.body(x)

    cfg = load_config(overrides=[*TINY, f"federation.client_timeout={TIMEOUT}"])
    with pytest.warns(RuntimeWarning, match="client_timeout: worker processes could not start"):
        s = run_experiment(cfg, tmp_path / "r", model=Net())
    assert s["status"] == "completed" and s["failures_total"] == 1
    _check_abandoned(tmp_path / "r", victim)
