"""Crash safety, faulty clients and robust aggregation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sparsefl.comm import Update
from sparsefl.config import load_config
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.orphans import all_pids, proc_stat
from sparsefl.protocol.faults import KINDS, draw_fault
from sparsefl.protocol.messages import Received
from sparsefl.runtime.server import RoundFailed, Server

TINY = [
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=4",
    "data.min_samples=5",
]
VOLATILE = ("seconds", "clients")


def _metrics(folder):
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(w in k for w in VOLATILE)} for r in rows]


def test_injected_faults_are_dropped_and_accounted_for(tmp_path):
    over = [*TINY, "federation.rounds=5", "faults.crash_prob=0.2", "faults.nan_prob=0.2", "faults.corrupt_prob=0.2"]
    cfg = load_config(overrides=over)
    s = run_experiment(cfg, tmp_path / "r")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    failures = [f for r in rows for f in r["failures"]]
    # every drawn fault shows up, with the matching reason
    expected = []
    for r in rows:
        attempts = {f["attempt"] for f in r["failures"]} | {0}
        for a in range(max(attempts) + 1):
            from sparsefl.protocol.sampling import sample_clients

            for c in sample_clients(cfg.seed, r["round"], 6, 3, a):
                k = draw_fault(cfg.faults, cfg.seed, r["round"], a, c)
                if k is not None:
                    expected.append((r["round"], a, c, k))
    got = sorted((r["round"], f["attempt"], f["client"], f["injected"]) for r in rows for f in r["failures"])
    assert got == sorted(expected) and got
    for f in failures:
        assert {"crash": "crashed", "nan": "decode", "corrupt": "decode"}[f["injected"]] in f["reason"]
    assert s["failures_total"] == len(failures)
    assert all(r["accuracy"] is not None for r in rows)


def test_stragglers_over_the_timeout_are_dropped(tmp_path):
    over = [*TINY, "faults.straggler_prob=0.5", "federation.client_timeout=600"]
    run_experiment(load_config(overrides=over), tmp_path / "r")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    fails = [f for r in rows for f in r["failures"]]
    assert fails and all(f["injected"] == "straggler" and f["reason"].startswith("timeout") for f in fails)


def test_fault_draws_are_seeded_and_follow_the_probabilities():
    cfg = load_config(overrides=["faults.crash_prob=0.3", "faults.nan_prob=0.1"]).faults
    draws = [draw_fault(cfg, 0, r, 0, c) for r in range(50) for c in range(40)]
    assert draws == [draw_fault(cfg, 0, r, 0, c) for r in range(50) for c in range(40)]
    assert abs(draws.count("crash") / len(draws) - 0.3) < 0.04
    assert abs(draws.count("nan") / len(draws) - 0.1) < 0.03
    assert set(draws) <= {None, *KINDS}


def test_too_few_clients_stops_with_a_resumable_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(overrides=[*TINY, "federation.min_clients=3", "federation.max_round_retries=1"])
    real = Server.make_tasks

    def crash_from_round_3(self, state, rnd, clients, attempt=0):
        tasks = real(self, state, rnd, clients, attempt)
        if rnd >= 3:
            from dataclasses import replace

            tasks = [replace(t, fault="crash") for t in tasks]
        return tasks

    monkeypatch.setattr(Server, "make_tasks", crash_from_round_3)
    with pytest.raises(RoundFailed, match="min_clients=3.*rerun to resume"):
        run_experiment(cfg, tmp_path / "r")
    assert len((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(Server, "make_tasks", real)
    resumed = run_experiment(cfg, tmp_path / "r")
    whole = run_experiment(cfg, tmp_path / "whole")
    assert resumed["model_sha256"] == whole["model_sha256"]


def test_norm_rejection_drops_the_outlier():
    cfg = load_config(overrides=[*TINY, "federation.norm_reject_k=3"])
    b = build(cfg)
    state = b.method.init_state(dict(b.spec.build().state_dict()))
    server = Server(cfg, b.method, None, b.data.x_test, b.data.y_test)  # type: ignore[arg-type]

    def rec(cid, scale):
        vals = {k: (v + scale if v.is_floating_point() else v) for k, v in state.params.items()}
        return Received(cid, Update(vals), 10)

    ok = [(type("R", (), {"client_id": c})(), rec(c, s)) for c, s in enumerate([0.01, 0.012, 0.011, 5.0])]
    failures: list = []
    kept = server._reject_outliers(state, ok, 0, failures)
    assert [r.client_id for _, r in kept] == [0, 1, 2]
    assert failures[0]["client"] == 3 and "norm_reject_k" in failures[0]["reason"]


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, interrupted_run):
    cfg = load_config(overrides=TINY)
    whole = run_experiment(cfg, tmp_path / "whole")
    interrupted_run(cfg, tmp_path / "cut", at=4)
    ck = tmp_path / "cut" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:-100])  # truncated
    logs: list[str] = []
    resumed = run_experiment(cfg, tmp_path / "cut", log=logs.append)
    assert any("damaged" in m for m in logs) and any("after round 2" in m for m in logs)
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")


def test_fallback_checkpoint_keeps_its_client_files_on_disk(tmp_path, interrupted_run):
    """Resuming from checkpoint.prev.pt (round r-1) needs each client's newest state file as of
    round r-1, which round r's commit used to delete when that client trained again in round r."""
    cfg = load_config(
        overrides=[
            *TINY,
            "federation.rounds=5",
            "federation.client_state='disk'",
            "method.name=hidenseek",
            "method.sparsity=0.8",
            "method.synflow_iterations=5",
        ]
    )
    whole = run_experiment(cfg, tmp_path / "whole")
    interrupted_run(cfg, tmp_path / "cut", at=5)
    ck = tmp_path / "cut" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:-100])  # round 4's checkpoint is damaged: resume after round 3
    logs: list[str] = []
    resumed = run_experiment(cfg, tmp_path / "cut", log=logs.append)
    assert any("after round 3" in m for m in logs)
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")


def _run_cli(out, extra_env=None, kill_after=None):
    env = dict(os.environ, **(extra_env or {}))
    cmd = [sys.executable, "-m", "sparsefl.cli.main", "run", "--out", str(out)]
    for o in [*TINY, "federation.rounds=6", "federation.client_state='disk'"]:
        cmd += ["--set", o]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is not None:
        time.sleep(kill_after)
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=300)
    return p.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert _run_cli(out) == 0
    return out


@pytest.mark.parametrize(
    "kill",
    [
        {"SPARSEFL_KILL_DURING_WRITE": "checkpoint.pt:3"},
        {"SPARSEFL_KILL_DURING_WRITE": "metrics.jsonl:4"},
        {"SPARSEFL_KILL_DURING_WRITE": "client-1.r2.safetensors:1"},
        {"SPARSEFL_KILL_DURING_WRITE": "summary.json:1"},
        {"after_seconds": 4.0},
    ],
    ids=["mid-checkpoint", "mid-metrics", "mid-client-state", "mid-summary", "timer"],
)
def test_sigkill_at_any_point_then_resume_gives_the_same_bits(tmp_path, uninterrupted, kill):
    out = tmp_path / "run"
    if "after_seconds" in kill:
        _run_cli(out, kill_after=kill["after_seconds"])
    else:
        assert _run_cli(out, extra_env=kill) == -signal.SIGKILL
    assert _run_cli(out) == 0
    a = json.loads((out / "summary.json").read_text())
    b = json.loads((uninterrupted / "summary.json").read_text())
    assert a["model_sha256"] == b["model_sha256"]
    assert _metrics(out) == _metrics(uninterrupted)
    assert a["rounds"] == 6
    assert not list(out.glob(".*.tmp-*")), "temporary files of the killed write are cleaned up"


def test_metrics_lacking_the_last_round_resume_from_the_previous_checkpoint(tmp_path, interrupted_run):
    """A metrics.jsonl that lost the newest checkpoint's line (damaged, hand-edited) no longer
    restarts the run from round 1: the previous checkpoint, whose rounds it holds, is used."""
    cfg = load_config(overrides=TINY)
    whole = run_experiment(cfg, tmp_path / "whole")
    interrupted_run(cfg, tmp_path / "cut", at=4)
    m = tmp_path / "cut" / "metrics.jsonl"
    lines = m.read_text().splitlines(keepends=True)
    m.write_text("".join(lines[:2]))  # round 3's line is gone
    logs: list[str] = []
    resumed = run_experiment(cfg, tmp_path / "cut", log=logs.append)
    assert any("lacks rounds of the checkpoint of round 3" in x for x in logs)
    assert any("after round 2" in x for x in logs)
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out = []
    for pid in all_pids():
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pgid and proc_stat(pid) is not None:
                out.append(pid)
    return out


def test_ctrl_c_with_worker_processes_prints_one_line_and_leaves_no_process(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) after the
    first round of ``sparsefl run --set jobs=2``, at a few moments, once with a client timeout
    (its own workers): exit code 130, the CLI's one line and no traceback (the workers ignore
    SIGINT; this process stops them), and no process of the run left."""
    timeout = ["federation.client_timeout=60"]
    for i, (delay, extra) in enumerate([(0.0, []), (0.1, []), (0.25, []), (0.1, timeout)]):
        out = tmp_path / f"r{i}"
        cmd = [sys.executable, "-m", "sparsefl.cli.main", "run", "--out", str(out)]
        for o in ["jobs=2", "federation.rounds=50", *extra]:
            cmd += ["--set", o]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            metrics = out / "metrics.jsonl"
            deadline = time.monotonic() + 120
            while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(delay)
            assert p.poll() is None, "the run ended before the interrupt"
            os.killpg(p.pid, signal.SIGINT)
            err = p.communicate(timeout=60)[1].decode()
        finally:
            p.kill()
        assert p.returncode == 130, err
        assert "Traceback" not in err and err.strip().splitlines() == [
            "interrupted; the run folder holds the last complete round (rerun to resume)"
        ], err
        deadline = time.monotonic() + 10
        while _group(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group(p.pid), "a worker process survived"
