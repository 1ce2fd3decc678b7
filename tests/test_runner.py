"""End-to-end runs on digits: the run-folder contract, determinism, byte accounting, resume."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest
import torch

from sparsefl.config import load_config
from sparsefl.engines import embedded
from sparsefl.engines.embedded import EmbeddedEngine
from sparsefl.errors import RunFolderError
from sparsefl.experiment.runfolder import RunFolder, checkpoint_bytes
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.runtime import client as client_runtime
from sparsefl.runtime.server import Server

TINY = [
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=3",
    "data.min_samples=5",
]

SUMMARY_KEYS = {
    "final_accuracy",
    "best_accuracy",
    "rounds",
    "num_params",
    "density",
    "uplink_bytes_total",
    "downlink_bytes_total",
    "train_flops_total",
    "train_flops_dense_total",
    "client_seconds_total",
    "wall_seconds",
    "model_sha256",
}
ROUND_KEYS = {
    "round",
    "accuracy",
    "loss",
    "uplink_bytes",
    "downlink_bytes",
    "train_flops",
    "train_flops_dense",
    "client_seconds",
    "clients",
    "failures",
}


def test_run_folder_contract(tmp_path):
    cfg = load_config(overrides=TINY)
    s = run_experiment(cfg, tmp_path / "run")
    d = tmp_path / "run"
    for f in (
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "model.safetensors",
        "mask.safetensors",
        "accuracy_vs_round.svg",
        "accuracy_vs_uplink.svg",
    ):
        assert (d / f).is_file(), f
    summary = json.loads((d / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert all(ROUND_KEYS <= set(r) for r in lines)
    assert len(lines[0]["clients"]) == 3
    assert summary["uplink_bytes_total"] == sum(r["uplink_bytes"] for r in lines) > 0
    assert summary["density"] == 1.0 and summary["rounds"] == 3
    assert summary["train_flops_total"] == summary["train_flops_dense_total"] > 0
    assert summary["inference_flops_per_sample"] == summary["inference_flops_per_sample_dense"] > 0
    assert json.loads((d / "config.json").read_text())["federation"]["rounds"] == 3
    assert s["model_sha256"] == summary["model_sha256"]


def test_same_seed_same_bits_different_seed_different_bits(tmp_path):
    a = run_experiment(load_config(overrides=TINY), tmp_path / "a")
    b = run_experiment(load_config(overrides=TINY), tmp_path / "b")
    c = run_experiment(load_config(overrides=[*TINY, "seed=1"]), tmp_path / "c")
    assert a["model_sha256"] == b["model_sha256"] != c["model_sha256"]
    ma = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "clients"}  # noqa: E731
    assert [strip(x) for x in ma] == [strip(x) for x in mb]


def test_uplink_and_downlink_bytes_are_the_real_payload_lengths():
    cfg = load_config(overrides=TINY)
    b = build(cfg)
    seen = {"up": 0, "down": 0}

    class Recording(EmbeddedEngine):
        def run(self, tasks, on_result=None):  # reports nothing: the server decodes after run()
            seen["down"] += sum(len(t.payload) for t in tasks)
            outs = super().run(tasks)
            seen["up"] += sum(len(o.payload) for o in outs)
            return outs

    eng = Recording(b.method, b.data.x_train, b.data.y_train, b.split)
    server = Server(cfg, b.method, eng, b.data.x_test, b.data.y_test)
    state = b.method.init_state(dict(b.spec.build().state_dict()))
    _, rec = server.run_round(state, 1)
    assert rec.uplink_bytes == seen["up"] > 0
    assert rec.downlink_bytes == seen["down"] > 0
    assert sum(c["uplink_bytes"] for c in rec.clients) == rec.uplink_bytes


def test_finished_run_is_reported_and_other_config_refused(tmp_path):
    cfg = load_config(overrides=TINY)
    first = run_experiment(cfg, tmp_path / "r")
    again = run_experiment(cfg, tmp_path / "r")
    assert again["status"] == "finished" and again["model_sha256"] == first["model_sha256"]
    with pytest.raises(RunFolderError, match="different configuration"):
        run_experiment(load_config(overrides=[*TINY, "seed=9"]), tmp_path / "r")
    forced = run_experiment(cfg, tmp_path / "r", force=True)
    assert forced["status"] == "completed" and forced["model_sha256"] == first["model_sha256"]


def test_interrupted_run_resumes_to_the_same_bits(tmp_path, interrupted_run):
    cfg = load_config(overrides=[*TINY, "federation.rounds=4"])
    whole = run_experiment(cfg, tmp_path / "whole")

    interrupted_run(cfg, tmp_path / "cut", at=3)
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 2
    resumed = run_experiment(cfg, tmp_path / "cut")
    assert resumed["model_sha256"] == whole["model_sha256"]
    assert resumed["rounds"] == 4


def test_metrics_log_is_appended_and_resume_drops_lines_past_the_checkpoint(tmp_path, interrupted_run):
    """metrics.jsonl is an append-only log; the checkpoint records how many of its lines it
    covers. A line appended after the checkpoint (a crash before the checkpoint was written)
    or a torn last line is dropped on resume, which then gives the uninterrupted run's bits."""
    cfg = load_config(overrides=[*TINY, "federation.rounds=4"])
    whole = run_experiment(cfg, tmp_path / "whole")
    interrupted_run(cfg, tmp_path / "cut", at=3)
    folder = RunFolder(tmp_path / "cut")
    ckpt = folder.latest_checkpoint()
    assert ckpt is not None and ckpt["metrics_count"] == 2 and "metrics" not in ckpt
    log = tmp_path / "cut" / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines) + lines[-1].replace('"round": 2', '"round": 3') + '{"round": 4, "acc')
    assert len(folder.read_metrics()) == 3  # the torn line is not read
    resumed = run_experiment(cfg, tmp_path / "cut")
    assert resumed["model_sha256"] == whole["model_sha256"]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "clients"}  # noqa: E731
    ma = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    mb = log.read_text().splitlines()
    assert [strip(x) for x in ma] == [strip(x) for x in mb]


def test_checkpoints_that_carry_their_records_still_resume(tmp_path, interrupted_run):
    """Checkpoints written before metrics.jsonl became append-only hold every record."""
    cfg = load_config(overrides=[*TINY, "federation.rounds=4"])
    whole = run_experiment(cfg, tmp_path / "whole")
    interrupted_run(cfg, tmp_path / "cut", at=3)
    folder = RunFolder(tmp_path / "cut")
    ckpt = folder.latest_checkpoint()
    assert ckpt is not None
    records = folder.read_metrics()[: ckpt.pop("metrics_count")]
    folder.write_checkpoint(checkpoint_bytes({**ckpt, "metrics": records}))
    (tmp_path / "cut" / "metrics.jsonl").write_text("")  # the old layout rewrote it; the checkpoint rules
    assert run_experiment(cfg, tmp_path / "cut")["model_sha256"] == whole["model_sha256"]


def test_client_state_on_disk_gives_the_same_result(tmp_path):
    a = run_experiment(load_config(overrides=TINY), tmp_path / "mem")
    b = run_experiment(load_config(overrides=[*TINY, "federation.client_state='disk'"]), tmp_path / "disk")
    assert a["model_sha256"] == b["model_sha256"]


def test_default_experiment_reaches_093_in_fp32_and_bf16(tmp_path):
    """The README's default run: digits, 20 clients, alpha 0.5, cnn, FedAvg, 10/round, 30 rounds;
    bfloat16 local training (autocast, channels_last) ends within 1 point of fp32."""
    s = run_experiment(load_config(), tmp_path / "default")
    assert s["final_accuracy"] >= 0.93
    b = run_experiment(load_config(overrides=["local.precision='bf16'"]), tmp_path / "bf16")
    assert abs(b["final_accuracy"] - s["final_accuracy"]) <= 0.01
    assert b["model_sha256"] != s["model_sha256"]


def test_a_folder_of_jobs_1_resumes_with_jobs_2_to_the_same_bits(tmp_path, interrupted_run):
    """``jobs`` is not part of a run's identity: it changes where clients run, not the bits."""
    cfg = load_config(overrides=[*TINY, "federation.rounds=4"])
    whole = run_experiment(cfg, tmp_path / "whole")
    interrupted_run(cfg, tmp_path / "cut", at=3)
    logs: list[str] = []
    resumed = run_experiment(
        load_config(overrides=[*TINY, "federation.rounds=4", "jobs=2"]), tmp_path / "cut", log=logs.append
    )
    assert any("after round 2" in line for line in logs)
    assert resumed["model_sha256"] == whole["model_sha256"]


def test_worker_processes_give_the_same_bits(tmp_path):
    a = run_experiment(load_config(overrides=TINY), tmp_path / "j1")
    b = run_experiment(load_config(overrides=[*TINY, "jobs=2"]), tmp_path / "j2")
    assert a["model_sha256"] == b["model_sha256"]


def _rounds(cfg, engine_jobs, wait, rounds=3):
    """Run ``rounds`` rounds on an engine of ``engine_jobs``; returns (final params, engine)."""
    b = build(cfg)
    eng = EmbeddedEngine(b.method, b.data.x_train, b.data.y_train, b.split, engine_jobs)
    try:
        if wait:
            assert eng.wait_ready()
        server = Server(cfg, b.method, eng, b.data.x_test, b.data.y_test)
        state = b.method.init_state(dict(b.spec.build().state_dict()))
        for rnd in range(1, rounds + 1):
            state, _ = server.run_round(state, rnd)
    finally:
        eng.close()
    return state.params, eng


def _engine_and_server(cfg, jobs):
    """An engine of ``jobs`` (its workers up), a server on it, and the initial state."""
    b = build(cfg)
    eng = EmbeddedEngine(b.method, b.data.x_train, b.data.y_train, b.split, jobs)
    assert jobs == 1 or eng.wait_ready()
    server = Server(cfg, b.method, eng, b.data.x_test, b.data.y_test)
    proxy = (b.data.x_train[:256], b.data.y_train[:256])
    return eng, server, b.method.init_state(dict(b.spec.build().state_dict()), proxy)


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fork-server"])
def test_clients_split_between_this_process_and_workers_give_the_same_bits(monkeypatch, fork):
    """Once the workers run, clients are shared between them and this process (each takes the
    next task, largest first): every parameter equals the one-process run bit for bit, with
    workers forked from this process and from the fork server alike."""
    monkeypatch.setattr(embedded, "forks", lambda threads: fork)
    cfg = load_config(overrides=[*TINY, "federation.clients_per_round=6"])
    one, _ = _rounds(cfg, 1, wait=False)
    three, eng = _rounds(cfg, 3, wait=True)
    assert 0 < eng.ran_in_workers < 3 * 6  # both the workers and this process ran clients
    if not fork:  # shared before the pool's thread pickled them (that move raced with our reads)
        assert eng.x.is_shared() and eng.y.is_shared()
        assert all(p.is_shared() for p in eng.method.spec.template.parameters())
    assert one.keys() == three.keys()
    for k in one:
        assert torch.equal(one[k], three[k]), k
    assert not [t for t in threading.enumerate() if t.name == "sparsefl-results"]  # stopped with the pool


def test_tasks_start_largest_first():
    """The round's tasks start by the client's training samples, most first (ties in task
    order), so the small ones fill the gaps at the end of the round."""
    cfg = load_config(overrides=[*TINY, "federation.clients_per_round=6"])
    b = build(cfg)
    eng = EmbeddedEngine(b.method, b.data.x_train, b.data.y_train, b.split, 2)
    server = Server(cfg, b.method, eng, b.data.x_test, b.data.y_test)
    state = b.method.init_state(dict(b.spec.build().state_dict()), (b.data.x_train[:256], b.data.y_train[:256]))
    tasks = server.make_tasks(state, 1, [5, 0, 3, 1, 4, 2])
    sizes = [len(b.split.train[t.client_id]) for t in tasks]
    assert len(set(sizes)) > 1
    order = list(eng._largest_first(tasks))
    assert sorted(order) == list(range(6))
    assert order == sorted(range(6), key=lambda i: (-sizes[i], i))
    # and the round follows it: the workers get the whole list in that order, and every
    # process claims the next position of it; this process's tasks come in that order too
    sent: list[list[int]] = []
    here: list[int] = []
    try:
        assert eng.wait_ready()
        real_submit, real_here = eng._pool.submit, eng._run_here

        def submit(fn, key, ordered_tasks, ordered_states):  # type: ignore[no-untyped-def]
            sent.append([t.client_id for t in ordered_tasks])
            return real_submit(fn, key, ordered_tasks, ordered_states)

        def run_here(task, state):  # type: ignore[no-untyped-def]
            here.append(task.client_id)
            return real_here(task, state)

        eng._pool.submit, eng._run_here = submit, run_here  # type: ignore[method-assign]
        outs = eng.run(tasks)
        ran_in_workers = eng.ran_in_workers
    finally:
        eng.close()
    lpt = [tasks[i].client_id for i in order]
    assert sent == [lpt]
    assert here == [c for c in lpt if c in here]
    assert ran_in_workers == len(tasks) - len(here)
    assert [o.client_id for o in outs] == [t.client_id for t in tasks]


def test_a_task_the_pool_refuses_runs_in_this_process(monkeypatch):
    """Tasks the pool does not take (here: submit raises, as after a shutdown) run in this
    process: same bits, no failure recorded."""
    cfg = load_config(overrides=[*TINY, "federation.clients_per_round=6"])
    one, _ = _rounds(cfg, 1, wait=False, rounds=1)
    b = build(cfg)
    eng = EmbeddedEngine(b.method, b.data.x_train, b.data.y_train, b.split, 2)
    try:
        assert eng.wait_ready()
        pool = eng._pool
        calls: list[int] = []

        def refuse(*a, **k):  # type: ignore[no-untyped-def]
            calls.append(1)
            raise RuntimeError("cannot schedule new futures after shutdown")

        monkeypatch.setattr(pool, "submit", refuse)
        server = Server(cfg, b.method, eng, b.data.x_test, b.data.y_test)
        state = b.method.init_state(dict(b.spec.build().state_dict()))
        state, record = server.run_round(state, 1)
    finally:
        eng.close()
    assert len(calls) == 1 and not record.failures and eng.ran_in_workers == 0
    for k in one:
        assert torch.equal(one[k], state.params[k]), k


@pytest.mark.parametrize("holding_lock", [False, True], ids=["running", "holding-the-counter-lock"])
def test_a_worker_that_dies_fails_its_task_and_the_pool_restarts(monkeypatch, holding_lock):
    """A worker that dies mid-round (here: on its first task of round 1) fails the task it had
    claimed (``worker process died``); this process runs the rest of the round, and the next
    round runs on a new pool. A worker killed while it holds the task counter's lock never
    releases it: this process notices the broken pool, shuts it down and claims the rest alone."""
    parent = os.getpid()
    real = embedded.execute_task

    def dying(method, data, task, state):  # type: ignore[no-untyped-def]
        if os.getpid() != parent and task.round == 1:
            if holding_lock:
                embedded._W["claims"].get_lock().acquire()
            os._exit(3)
        return real(method, data, task, state)

    monkeypatch.setattr(embedded, "execute_task", dying)  # forked workers inherit it
    monkeypatch.setattr(embedded, "forks", lambda threads: True)
    eng, server, state = _engine_and_server(load_config(overrides=[*TINY, "federation.clients_per_round=6"]), 2)
    try:
        state, r1 = server.run_round(state, 1)
        assert [f["reason"] for f in r1.failures] == ["worker process died"]
        assert len(r1.clients) == 5
        assert eng._pool is None  # stopped; the next round starts a new one
        assert eng.wait_ready()
        state, r2 = server.run_round(state, 2)
        assert not r2.failures and len(r2.clients) == 6
    finally:
        eng.close()
    assert not [t for t in threading.enumerate() if t.name == "sparsefl-results"]


def test_a_pool_broken_between_rounds_is_restarted(monkeypatch):
    """A worker that dies while idle breaks the pool: the next round runs here (the pool refuses
    the round), and the round after it has workers again."""
    import signal

    monkeypatch.setattr(embedded, "forks", lambda threads: True)
    eng, server, state = _engine_and_server(load_config(overrides=[*TINY, "federation.clients_per_round=6"]), 2)
    try:
        state, _ = server.run_round(state, 1)
        broken = eng._pool
        for proc in list(broken._processes.values()):  # type: ignore[union-attr]
            os.kill(proc.pid, signal.SIGKILL)
        for _ in range(200):  # the pool notices within milliseconds
            if broken._broken:  # type: ignore[union-attr]
                break
            time.sleep(0.01)
        state, r2 = server.run_round(state, 2)
        assert not r2.failures and len(r2.clients) == 6
        assert eng._pool is not broken
        assert eng.wait_ready()
        before = eng.ran_in_workers
        state, r3 = server.run_round(state, 3)
        assert not r3.failures and eng.ran_in_workers > before
    finally:
        eng.close()


def test_workers_fork_only_where_gnu_openmp_allows():
    assert embedded.forks(1) == (sys.platform == "linux")
    assert not embedded.forks(2)  # a forked child's OpenMP parallel region hangs


def test_workers_that_cannot_start_leave_every_client_to_this_process(monkeypatch):
    """A pool whose workers fail to start (here: a method that cannot be pickled to the fork
    server's workers) is reported with a warning, and the run goes on in this process with the
    same result."""
    monkeypatch.setattr(embedded, "forks", lambda threads: False)
    cfg = load_config(overrides=TINY)
    one, _ = _rounds(cfg, 1, wait=False)
    real_build = build

    def unpicklable_build(c):
        b = real_build(c)
        b.method.unpicklable = lambda: None  # lambdas do not pickle
        return b

    monkeypatch.setattr(sys.modules[__name__], "build", unpicklable_build)
    with pytest.warns(RuntimeWarning, match="worker processes could not start"):
        two, eng = _rounds(cfg, 2, wait=False)
        eng_ready = eng.wait_ready()
    assert not eng_ready and eng.ran_in_workers == 0
    for k in one:
        assert torch.equal(one[k], two[k]), k


def test_pipelined_round_ends_record_what_the_serial_loop_computes(tmp_path):
    """The runner evaluates and records round r in its server thread while round r+1 trains;
    every record (accuracy and loss included) equals the one of a plain run_round loop."""
    cfg = load_config(overrides=[*TINY, "federation.rounds=4"])
    run_experiment(cfg, tmp_path / "run")
    got = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    b = build(cfg)
    eng = EmbeddedEngine(b.method, b.data.x_train, b.data.y_train, b.split)
    server = Server(cfg, b.method, eng, b.data.x_test, b.data.y_test)
    state = b.method.init_state(dict(b.spec.build().state_dict()), (b.data.x_train[:256], b.data.y_train[:256]))
    timed = {"client_seconds", "round_seconds", "eval_seconds", "seconds"}
    for rnd, rec in enumerate(got, start=1):
        state, want = server.run_round(state, rnd)
        w = want.to_json()
        assert [c["id"] for c in rec["clients"]] == [c["id"] for c in w["clients"]]
        assert {k: v for k, v in rec.items() if k not in timed and k != "clients"} == {
            k: v for k, v in w.items() if k not in timed and k != "clients"
        }
        assert rec["accuracy"] is not None and rec["loss"] is not None


def test_a_failed_round_end_stops_the_run_and_records_nothing_after_it(tmp_path, monkeypatch):
    """A write that fails in the server thread (here: metrics.jsonl at round 2) stops the run
    with that error; no later round is recorded, and the rerun resumes after round 1."""
    cfg = load_config(overrides=[*TINY, "federation.rounds=4"])
    real = RunFolder.append_metrics

    def full_disk(self, record):
        if record["round"] == 2:
            raise OSError(28, "No space left on device")
        real(self, record)

    monkeypatch.setattr(RunFolder, "append_metrics", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_experiment(cfg, tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    assert [r["round"] for r in folder.read_metrics()] == [1]
    ckpt = folder.latest_checkpoint()
    assert ckpt is not None and ckpt["server"]["round"] == 1
    monkeypatch.setattr(RunFolder, "append_metrics", real)
    logs: list[str] = []
    again = run_experiment(cfg, tmp_path / "run", log=logs.append)
    assert any("resuming" in line and "after round 1" in line for line in logs)
    assert again["model_sha256"] == run_experiment(cfg, tmp_path / "fresh")["model_sha256"]


def test_disk_state_commit_keeps_what_its_checkpoint_needs(tmp_path):
    """commit(r) runs in the server thread while round r+1 writes newer files: it deletes only
    files older than the versions of round r's end."""
    store = embedded.ClientStateStore(tmp_path)
    s = {"v": torch.ones(2)}
    store.put(1, s, 1)
    store.put(1, s, 2)
    at_round_2 = store.versions()
    store.put(1, s, 3)  # round 3 is under way
    store.commit(2, at_round_2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-1.r2.safetensors", "client-1.r3.safetensors"]
    store.restore({}, 2)  # a crash now resumes from round 2's checkpoint: its file is there
    assert torch.equal(store.get(1)["v"], s["v"]) and store.versions() == {1: 2}


@pytest.mark.parametrize("jobs", [1, 2])
def test_engines_report_every_outcome_once_as_it_is_done(jobs):
    cfg = load_config(overrides=[*TINY, "federation.clients_per_round=5"])
    b = build(cfg)
    eng = EmbeddedEngine(b.method, b.data.x_train, b.data.y_train, b.split, jobs)
    try:
        if jobs > 1:
            assert eng.wait_ready()
        server = Server(cfg, b.method, eng, b.data.x_test, b.data.y_test)
        state = b.method.init_state(dict(b.spec.build().state_dict()), (b.data.x_train[:256], b.data.y_train[:256]))
        tasks = server.make_tasks(state, 1, [0, 1, 2, 3, 4])
        seen: list[int] = []
        outs = eng.run(tasks, on_result=lambda i, out: seen.append(i) or None)
    finally:
        eng.close()
    assert sorted(seen) == list(range(5))
    assert all(o.client_id == t.client_id for o, t in zip(outs, tasks))


def test_an_error_in_on_result_is_raised_once_every_task_is_back():
    eng, server, state = _engine_and_server(load_config(overrides=[*TINY, "federation.clients_per_round=4"]), 2)
    try:
        tasks = server.make_tasks(state, 1, [0, 1, 2, 3])

        def broken(i, out):
            raise ValueError("bad callback")

        with pytest.raises(ValueError, match="bad callback"):
            eng.run(tasks, on_result=broken)
        assert sorted(eng.store.snapshot()) == [0, 1, 2, 3]  # every result was stored
        assert len(eng.run(tasks)) == 4  # and the engine is still usable
    finally:
        eng.close()


def test_a_round_end_failing_behind_another_error_is_logged(tmp_path, monkeypatch):
    cfg = load_config(overrides=[*TINY, "federation.rounds=4"])
    real_append, real_train = RunFolder.append_metrics, Server.train_round

    def full_disk(self, record):
        if record["round"] == 2:
            raise OSError(28, "No space left on device")
        real_append(self, record)

    def stop(self, state, rnd):
        if rnd == 3:
            raise KeyboardInterrupt
        return real_train(self, state, rnd)

    monkeypatch.setattr(RunFolder, "append_metrics", full_disk)
    monkeypatch.setattr(Server, "train_round", stop)
    logs: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", log=logs.append)
    assert any("No space left" in line for line in logs)
    assert [r["round"] for r in RunFolder(tmp_path / "run").read_metrics()] == [1]


def test_force_removes_every_file_of_the_previous_run(tmp_path):
    cfg = load_config(overrides=TINY)
    run_experiment(cfg, tmp_path / "r")
    (tmp_path / "r" / "accuracy_vs_round.png").write_bytes(b"from an older version")
    RunFolder(tmp_path / "r").reset()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == []


def test_client_data_is_gathered_once_per_client_when_the_training_set_is_small(monkeypatch, tmp_path) -> None:
    """A small training set has each client's share kept after its first task (the same
    tensors every round); above KEEP_CLIENT_DATA_BYTES it is gathered per task. Either
    way a client gets exactly its rows, and a run gives the same bits."""
    b = build(load_config(None, ["data.val_fraction=0.2"]), None)
    kept = client_runtime.ClientDataSource(b.data.x_train, b.data.y_train, b.split)
    monkeypatch.setattr(client_runtime, "KEEP_CLIENT_DATA_BYTES", 0)
    fresh = client_runtime.ClientDataSource(b.data.x_train, b.data.y_train, b.split)
    assert kept.keep and not fresh.keep
    for cid in (0, 3):
        idx, vidx = (torch.from_numpy(s[cid]) for s in (b.split.train, b.split.val))
        a, again, f = kept(cid), kept(cid), fresh(cid)
        assert a is again and f is not fresh(cid)
        assert kept.gathers == (1 if cid == 0 else 2)  # a kept share is gathered once
        for d in (a, f):
            assert torch.equal(d.x, b.data.x_train[idx]) and torch.equal(d.y, b.data.y_train[idx])
            assert d.x_val is not None and torch.equal(d.x_val, b.data.x_train[vidx]) and len(vidx)
    shas = []
    for limit in (0, 1 << 30):
        monkeypatch.setattr(client_runtime, "KEEP_CLIENT_DATA_BYTES", limit)
        shas.append(run_experiment(load_config(None, ["federation.rounds=3"]), tmp_path / str(limit))["model_sha256"])
    assert shas[0] == shas[1]
