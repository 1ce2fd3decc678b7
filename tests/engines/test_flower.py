"""The Flower adapter: records, options, export, and whole runs on Flower against the embedded engine.

The end-to-end tests start real Flower processes on 127.0.0.1 (a SuperLink, SuperNodes or
Ray) and take 20-60 s each; together they stay under ~4 minutes on 2 cores. They are in the
default run because they are the only proof that the adapter works.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomllib
import torch

pytest.importorskip("flwr")

import sparsefl  # noqa: E402
from sparsefl.apps.flower import FlowerRunError, LocalFederation, run_on_flower  # noqa: E402
from sparsefl.apps.flower.export import export_experiment, toml_value  # noqa: E402
from sparsefl.apps.flower.options import AppOptions, default_nodes  # noqa: E402
from sparsefl.config import load_config, to_dict  # noqa: E402
from sparsefl.engines.flower.engine import FlowerEngine, node_of_client, serialized_bytes  # noqa: E402
from sparsefl.engines.flower.records import (  # noqa: E402
    DOWN,
    UP,
    result_content,
    result_from_content,
    state_from_record,
    state_to_record,
    task_content,
    task_from_content,
)
from sparsefl.errors import ConfigError  # noqa: E402
from sparsefl.experiment.runner import run_experiment  # noqa: E402
from sparsefl.orphans import alive, descendants, kill_tree, tree  # noqa: E402
from sparsefl.protocol.messages import ClientResult, ClientTask  # noqa: E402
from sparsefl.registry import METHODS  # noqa: E402

TINY = [
    "federation.num_clients=4",
    "federation.clients_per_round=2",
    "federation.rounds=2",
    "data.min_samples=5",
]
#: Wall-clock fields: the only ones allowed to differ between engines.
VOLATILE = {"seconds", "client_seconds", "round_seconds", "eval_seconds", "wall_seconds", "client_seconds_total"}


#: Keys a method needs beyond the defaults.
METHOD_KEYS = {"zerofl": ["method.sparsity=0.8"]}


def _cfg(engine: str, method: str = "fedavg", *extra: str):
    keys = [*TINY, f'engine="{engine}"', f'method.name="{method}"', *METHOD_KEYS.get(method, []), *extra]
    return load_config(overrides=keys)


def _strip(obj):
    """``obj`` without wall-clock fields, recursively."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _no_leftovers(fed: LocalFederation) -> None:
    """Every process the federation started or spawned is gone (zombies count as gone)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [p for p, start in fed.seen.items() if alive(p, start)] + fed.tagged_pids()
        if not left:
            break
        time.sleep(0.2)
    assert not left, f"processes left behind: {left}"
    assert len(fed.seen) >= 3  # the SuperLink, its SuperExec, flwr run at least: the watcher saw them


# -- fast, in-process ---------------------------------------------------------------------------------
def test_task_and_result_records_round_trip_and_count_our_bytes():
    task = ClientTask(3, 7, b"\x01\x02payload-bytes", 0.0123456789, setup=b"setup!", fault="nan")
    content = task_content(task, "auto", "abc")
    back, sha = task_from_content(content)
    assert back == task and sha == "abc"
    down = content.array_records[DOWN]
    assert down["payload"].stype == "sparsefl/auto" and down["payload"].dtype == "uint8"
    # Flower counts data plus keys: exactly our bytes plus the key names
    assert down.count_bytes() == task.downlink_bytes + len("payload") + len("setup")
    assert task_from_content(task_content(ClientTask(1, 0, b"x", 0.1), "coo", "s"))[0].setup is None

    res = ClientResult(3, 7, b"up" * 50, 42, 0.5, 1e6, 2e6, 0.25, metrics={"steps": 3.0, "val_accuracy": 0.75})
    rc = result_content(res, "bitmask")
    got = result_from_content(rc)
    assert got == ClientResult(3, 7, res.payload, 42, 0.5, 1e6, 2e6, 0.25, metrics=res.metrics)
    assert list(got.metrics) == ["steps", "val_accuracy"]  # order survives (it shows in metrics.jsonl)
    up = rc.array_records[UP]
    assert up.count_bytes() == res.uplink_bytes + len("payload")
    assert 0 < serialized_bytes(up) - res.uplink_bytes < 1000  # framing: object headers, dtype/shape/stype


def test_client_state_round_trips_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(3, 4, generator=g),
        "mask": torch.rand(5, generator=g) > 0.5,
        "bf": torch.randn(6, generator=g).to(torch.bfloat16),
        "idx": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    back = state_from_record(state_to_record(state))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)) or v.numel() == 0
    back["w"] += 1  # fresh, writable tensors
    assert not torch.equal(back["w"], state["w"])


def test_node_state_files_follow_the_rounds_a_resumed_run_redoes(tmp_path):
    """Files of a redone round (another run, round >= the task's) are dropped; a re-sampled
    attempt of a round reads its own run's file of that round; old rounds are pruned."""
    from sparsefl.apps.flower.node_states import NodeStates, run_key

    st = lambda v: {"m": torch.full((2,), float(v))}  # noqa: E731
    run1 = NodeStates(tmp_path, "exp", run_id=1)
    assert run1.load(3, 1) == {}
    run1.save(3, 1, {})  # stateless: no file
    assert not (tmp_path / "exp").exists()
    for rnd in (1, 2, 5, 6):
        run1.save(3, rnd, st(rnd))
    assert float(run1.load(3, 6)["m"][0]) == 6  # a re-sampled attempt of round 6, same run
    assert float(run1.load(3, 7)["m"][0]) == 6
    run2 = NodeStates(tmp_path, "exp", run_id=2)  # resumed from the checkpoint of round 4
    assert float(run2.load(3, 5)["m"][0]) == 2  # rounds 5 and 6 of run 1 are redone
    # round 1 went when round 6 was saved: round 2 (<= 6 - ROUNDS_BACK) covers any checkpoint
    assert sorted(p.name for p in (tmp_path / "exp" / "client-3").iterdir()) == ["r2.run1.safetensors"]
    run2.save(3, 5, st(50))
    run2.save(3, 7, st(99))  # keeps round 2, its newest of a round <= 7 - ROUNDS_BACK, and later
    names = sorted(p.name for p in (tmp_path / "exp" / "client-3").iterdir())
    assert names == ["r2.run1.safetensors", "r5.run2.safetensors", "r7.run2.safetensors"]
    assert NodeStates(tmp_path, "other", run_id=2).load(3, 9) == {}  # per run key
    # a late task of the interrupted run wrote round 7 too: this run's own file of a round wins
    NodeStates(tmp_path, "exp", run_id=9).save(3, 7, st(-1))
    assert float(run2.load(3, 8)["m"][0]) == 99
    # a state whose keys share one tensor is stored (as copies)
    shared = torch.ones(3)
    run2.save(4, 1, {"a": shared, "b": shared})
    assert run2.load(4, 2).keys() == {"a", "b"}
    assert run_key("exp", "runs/a") != run_key("exp", "runs/b")  # two run folders keep apart


def test_options_round_trip_overrides_and_errors():
    cfg = _cfg("flower-local", "fedavg", "local.lr_end=0.01")
    opts = AppOptions.for_experiment(cfg, out="/x", nodes=3)
    rc = opts.to_run_config()
    assert all(isinstance(v, (str, int, float, bool)) for v in rc.values())  # Flower's run config types
    again = AppOptions.from_run_config(rc)
    assert again == opts and again.experiment() == cfg
    rc2 = {**rc, "sparsefl-set": "federation.rounds=5 'method.name=\"zerofl\"' method.sparsity=0.8"}
    over = AppOptions.from_run_config(rc2).experiment()
    assert over.federation.rounds == 5 and over.method.name == "zerofl"
    with pytest.raises(ConfigError, match="sparsefl-nodez"):
        AppOptions.from_run_config({**rc, "sparsefl-nodez": 2})
    with pytest.raises(ConfigError, match="sparsefl-config"):
        AppOptions.from_run_config({"sparsefl-out": "x"})
    with pytest.raises(ConfigError, match="sparsefl-nodes"):
        AppOptions.from_run_config({**rc, "sparsefl-nodes": 0})
    with pytest.raises(ConfigError, match="federation.rounds"):
        AppOptions.from_run_config({**rc, "sparsefl-set": "federation.rounds=0"}).experiment()
    # the reply wait: explicit, else client_timeout + grace, else one hour
    assert AppOptions(config_json="", reply_timeout=7).reply_wait(cfg) == 7
    assert AppOptions(config_json="").reply_wait(cfg) == 3600
    ct = _cfg("flower-local", "fedavg", "federation.client_timeout=5")
    assert AppOptions(config_json="", reply_grace=2).reply_wait(ct) == 7


def test_client_to_node_map_and_waves():
    nodes = [30, 10, 20]
    assert [node_of_client(c, nodes) for c in range(5)] == [10, 20, 30, 10, 20]
    eng = FlowerEngine(None, nodes, experiment="", codec_down="auto", codec_up="auto", reply_timeout=1)  # type: ignore[arg-type]
    tasks = [ClientTask(1, c, b"", 0.1) for c in (0, 3, 1, 6, 2)]
    # clients 0, 3, 6 share node 10: one per wave, in task order
    assert eng.waves(tasks) == [[0, 2, 4], [1], [3]]
    assert default_nodes(_cfg("flower-sim")) == 4
    assert default_nodes(_cfg("flower-local"), 3) == 3
    assert 1 <= default_nodes(_cfg("flower-local")) <= 2


def test_export_writes_a_valid_flower_app(tmp_path):
    from flwr.common.config import validate_config

    cfg = _cfg("flower-local", "fedavg", "local.lr_end=0.01")
    root = export_experiment(tmp_path / "app", cfg, out="runs/x", nodes=2)
    conf = tomllib.loads((root / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(conf, check_module=False)
    assert ok, errors
    app = conf["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "sparsefl_app.server_app:app",
        "clientapp": "sparsefl_app.client_app:app",
    }
    opts = AppOptions.from_run_config(app["config"])
    assert opts.experiment() == cfg and opts.out == "runs/x" and opts.nodes == 2
    for f in ("server_app.py", "client_app.py", "__init__.py"):
        assert (root / "sparsefl_app" / f).is_file()
    tricky = 'a "q" \\ \x7f \n'
    assert tomllib.loads("v = " + toml_value(tricky))["v"] == tricky


def test_cli_flower_export(tmp_path):
    import argparse

    from rich.console import Console

    from sparsefl.cli import flower

    parser = argparse.ArgumentParser()
    flower.register(parser.add_subparsers(dest="command"))
    exp = tmp_path / "exp.toml"
    exp.write_text('[federation]\nnum_clients = 4\nclients_per_round = 2\n[method]\nname = "zerofl"\nsparsity = 0.8\n')
    argv = ["flower", "export", str(tmp_path / "app"), "--config", str(exp), "--nodes", "2"]
    args = parser.parse_args([*argv, "--client-states", "/var/lib/sparsefl"])
    assert args.func(args, Console(file=open(os.devnull, "w"))) == 0
    conf = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    opts = AppOptions.from_run_config(conf["tool"]["flwr"]["app"]["config"])
    cfg = opts.experiment()
    assert cfg.method.name == "zerofl" and cfg.federation.num_clients == 4
    assert opts.client_states == "/var/lib/sparsefl"


def test_core_does_not_import_flower():
    code = (
        "import sys, sparsefl, sparsefl.experiment.runner, sparsefl.engines.flower, "
        "sparsefl.apps.flower.export, sparsefl.cli.flower; "
        "assert not [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')], 'flwr imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_serverapp_errors_come_back_as_one_line():
    from sparsefl.apps.flower import launch

    log = (
        "\x1b[92mINFO \x1b[0m:      sparsefl: round 1 acc 0.5 failures 0\n"
        '\x1b[91mERROR \x1b[0m:     sparsefl-error {"type": "RoundFailed", "message": "round 2: too few"}\n'
        "Traceback (most recent call last): ...\n"
    )
    assert launch._marked(log, launch.ERROR_MARK) == {"type": "RoundFailed", "message": "round 2: too few"}
    assert launch._marked(log, launch.RESULT_MARK) is None


def test_refuses_what_cannot_travel(tmp_path):
    with pytest.raises(FlowerRunError, match="custom model"):
        run_on_flower(_cfg("flower-sim"), tmp_path / "r", model=torch.nn.Linear(2, 2))
    with pytest.raises(FlowerRunError, match="embedded"):
        run_on_flower(_cfg("embedded"), tmp_path / "r")


# -- in process: FlowerEngine + the real ClientApp through a Grid that calls it directly ---------------
class InProcessGrid:
    """A Flower ``Grid`` stand-in that hands each message to sparsefl's ClientApp in this process,
    one ``Context`` (hence one ``context.state``) per node; nodes in ``dead`` never reply.
    A test aid pinned to flwr 1.41 (it sets message ids the way ``HttpGrid.push_messages`` does)."""

    def __init__(self, run_config: dict, node_ids: list[int], dead: tuple[int, ...] = (), run_id: int = 1) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {n: Context(run_id, n, {}, RecordDict(), run_config) for n in node_ids}
        self.inbox: dict[str, object] = {}
        self.dead = set(dead)
        self.delivered: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.inbox[m.metadata.message_id] = m
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        from sparsefl.apps.flower.client_app import app

        out = []
        for mid in message_ids:
            m = self.inbox.get(mid)
            if m is None or m.metadata.dst_node_id in self.dead:
                continue
            del self.inbox[mid]
            self.delivered.append(m.metadata.dst_node_id)
            out.append(app(m, self.contexts[m.metadata.dst_node_id]))
        return out


@pytest.fixture
def task_identity():
    """What a running ServerApp sets before it may construct instruction messages."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = old


def _engine(grid: InProcessGrid, cfg, **kw) -> FlowerEngine:
    from sparsefl.apps.flower.options import experiment_sha

    kw.setdefault("reply_timeout", 30.0)
    return FlowerEngine(
        grid,  # type: ignore[arg-type]
        grid.get_node_ids(),
        experiment=experiment_sha(cfg),
        codec_down=cfg.comm.down,
        codec_up=cfg.comm.up,
        poll=0.01,
        **kw,
    )


@pytest.mark.parametrize("method", ["fedavg", "zerofl"])
def test_in_process_grid_matches_embedded_with_faults_and_shared_nodes(tmp_path, task_identity, method):
    """3 of 5 clients per round on 2 nodes (so rounds need waves and nodes host several
    clients' states), with injected crashes, NaN and corrupted payloads: the same run folder."""
    if method not in METHODS:
        pytest.skip(f"method {method} is not registered yet")
    extra = [
        "federation.num_clients=5",
        "federation.clients_per_round=3",
        "federation.rounds=3",
        "faults.crash_prob=0.15",
        "faults.nan_prob=0.15",
        "faults.corrupt_prob=0.15",
    ]
    emb_cfg, fl_cfg = _cfg("embedded", method, *extra), _cfg("flower-local", method, *extra)
    emb = run_experiment(emb_cfg, tmp_path / "emb")
    grid = InProcessGrid(AppOptions.for_experiment(fl_cfg).to_run_config(), [11, 22])
    fl = run_experiment(fl_cfg, tmp_path / "fl", engine=_engine(grid, fl_cfg, trace=tmp_path / "t.jsonl"))
    assert fl["model_sha256"] == emb["model_sha256"]
    rows = _metrics(tmp_path / "fl")
    assert _strip(rows) == _strip(_metrics(tmp_path / "emb"))
    reasons = [f["reason"] for r in rows for f in r["failures"]]
    assert any(r.startswith("raised ") for r in reasons) and any(r.startswith("decode:") for r in reasons)
    waves = [json.loads(x)["wave"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert max(waves) >= 1  # some round had two clients of one node
    # each node kept only its own clients' state (c -> sorted(nodes)[c mod 2])
    for node, ctx in grid.contexts.items():
        for key in ctx.state.array_records:
            assert node_of_client(int(key.rsplit(".", 1)[1]), [11, 22]) == node


def test_clientapp_keeps_client_data_and_carries_task_settings(tmp_path, task_identity):
    """The ClientApp builds its experiment, and its clients' data shares, once per process: over
    a run, each client's share is gathered once however many tasks it gets. The server's
    per-task settings travel in the instruction (a client-scored static mask names its scoring
    client there), and the run gives the embedded engine's bits."""
    from sparsefl.apps.flower import client_app

    extra = ["federation.num_clients=5", "federation.clients_per_round=3", "federation.rounds=4"]
    extra += ["method.sparsity=0.9", "method.criterion=snip", "method.score_source=client"]
    emb = run_experiment(_cfg("embedded", "static_mask", *extra), tmp_path / "emb")
    cfg = _cfg("flower-local", "static_mask", *extra)
    client_app._experiment.cache_clear()
    grid = InProcessGrid(AppOptions.for_experiment(cfg).to_run_config(), [11, 22])
    fl = run_experiment(cfg, tmp_path / "fl", engine=_engine(grid, cfg))
    assert fl["model_sha256"] == emb["model_sha256"]
    tasks = sum(len(r["clients"]) + len(r["failures"]) for r in _metrics(tmp_path / "fl"))
    participants = {c["id"] for r in _metrics(tmp_path / "fl") for c in r["clients"]}
    info = client_app._experiment.cache_info()
    assert (info.misses, info.hits) == (1, tasks - 1)
    source = client_app._experiment(*_options_key(cfg)).data
    assert source.gathers == len(participants) < tasks


@pytest.mark.parametrize(
    "method,keys",
    [
        ("feddst", ["method.delta_r=1", "method.alpha=0.2", "method.r_end=1.0"]),
        ("prunefl", ["method.interval=2"]),
        ("fedtiny", ["method.adjust_every=1", "method.adjust_until=1.0"]),
        ("fedrts", ["method.adjust_every=1", "method.adjust_until=1.0"]),
    ],
)
def test_changing_masks_on_the_in_process_grid_give_the_embedded_bits(tmp_path, task_identity, method, keys):
    """Masks that change during training (a readjusting client's RigL step, PruneFL's
    reconfiguration with squared gradients in the uplink, FedTiny's and FedRTS's server-side
    adjustments from clients' top-K gradients) give the embedded engine's bits."""
    if method not in METHODS:
        pytest.skip(f"method {method} is not registered yet")
    extra = ["federation.num_clients=5", "federation.clients_per_round=3", "federation.rounds=3", *keys]
    emb = run_experiment(_cfg("embedded", method, *extra), tmp_path / "emb")
    cfg = _cfg("flower-local", method, *extra)
    grid = InProcessGrid(AppOptions.for_experiment(cfg).to_run_config(), [11, 22])
    fl = run_experiment(cfg, tmp_path / "fl", engine=_engine(grid, cfg))
    assert fl["model_sha256"] == emb["model_sha256"]
    assert _strip(_metrics(tmp_path / "fl")) == _strip(_metrics(tmp_path / "emb"))


def _options_key(cfg) -> tuple[str, str]:
    opts = AppOptions.from_run_config(AppOptions.for_experiment(cfg).to_run_config())
    return opts.config_json, opts.overrides


@pytest.mark.parametrize("method", ["fedskel", "hidenseek"])
def test_a_resumed_flower_run_keeps_client_state_on_the_nodes(tmp_path, task_identity, interrupted_run, method):
    """A resumed Flower run is a new Flower run, with empty ``context.state``: the client states
    come back from the nodes' state folder (``sparsefl-client-states``), so a stateful method
    resumes exactly as the embedded engine does. Without the folder, it does not."""
    # fedskel keeps its skeleton (and its own other filters) on the client between re-selections
    extra = ["federation.rounds=4", *(["method.reselect_every=4"] if method == "fedskel" else [])]
    emb = run_experiment(_cfg("embedded", method, *extra), tmp_path / "emb")
    fl_cfg = _cfg("flower-local", method, *extra)
    run_config = AppOptions.for_experiment(fl_cfg).to_run_config()
    shas = {}
    for kept in (True, False):
        rc = {**run_config, "sparsefl-client-states": str(tmp_path / f"states-{kept}") if kept else ""}
        out = tmp_path / f"fl-{kept}"
        interrupted_run(fl_cfg, out, 3, engine=_engine(InProcessGrid(rc, [11, 22], run_id=1), fl_cfg))
        resumed = _engine(InProcessGrid(rc, [11, 22], run_id=2), fl_cfg)  # a new Flower run
        shas[kept] = run_experiment(fl_cfg, out, engine=resumed)["model_sha256"]
    assert shas[True] == emb["model_sha256"]
    assert shas[False] != emb["model_sha256"]  # what the folder is for


def test_in_process_dead_node_and_config_mismatch_are_client_failures(tmp_path, task_identity):
    cfg = _cfg("flower-local")
    grid = InProcessGrid(AppOptions.for_experiment(cfg).to_run_config(), [5, 9], dead=(9,))
    eng = _engine(grid, cfg, reply_timeout=0.3)
    tasks = [ClientTask(1, c, b"not a payload", 0.1) for c in (0, 1, 2)]
    out = eng.run(tasks)
    assert [o.client_id for o in out] == [0, 1, 2]
    assert out[1].reason == "timeout: no reply from node 9 within 0.3 s"
    # client 0 and 2 share node 5: two waves; the ClientApp's own failure comes back verbatim
    assert grid.delivered == [5, 5]
    assert out[0].reason.startswith("raised ") and "DecodeError" in out[0].reason
    other = _cfg("flower-local", "fedavg", "seed=1")
    (bad,) = _engine(grid, other).run([ClientTask(1, 0, b"x", 0.1)])
    assert bad.reason.startswith("config mismatch")


# -- whole runs on Flower -----------------------------------------------------------------------------
#: fedavg, zerofl (stateless clients) and fedskel (each client keeps its skeleton: the nodes
#: write it to the run folder's flower-clients/, checked below)
EQUIVALENCE_METHODS = ("fedavg", "zerofl", "fedskel")


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory):
    """Each registered method of ``EQUIVALENCE_METHODS`` on the three engines (the tiny config).

    The flower-local runs (2 SuperNodes each) go in parallel threads while this thread runs the
    embedded and flower-sim runs: a Deployment mostly sleeps in Flower's polls, so overlapping
    them halves the suite's time. Returns ``method -> (folder, summaries, local run facts)``.
    """
    root = tmp_path_factory.mktemp("equivalence")
    methods = [m for m in EQUIVALENCE_METHODS if m in METHODS]

    def local(method: str) -> dict:
        feds: list[LocalFederation] = []
        seen: list[int] = []
        t0 = time.monotonic()
        summary = run_on_flower(
            _cfg("flower-local", method),
            root / method / "local",
            nodes=2,
            trace=root / method / "trace.jsonl",
            monitor=lambda fed: feds or feds.append(fed),
            progress=lambda record, meta: seen.append(record.round),
            timeout=170,
        )
        return {"summary": summary, "elapsed": time.monotonic() - t0, "feds": feds, "seen": seen}

    out = {}
    with ThreadPoolExecutor(max(1, len(methods))) as pool:
        futures = {m: pool.submit(local, m) for m in methods}
        for m in methods:
            emb = run_experiment(_cfg("embedded", m), root / m / "embedded")
            sim = sparsefl.run(_cfg("flower-sim", m), str(root / m / "sim"))  # through the engine dispatch
            out[m] = (root / m, emb, sim)
        return {m: (*out[m], futures[m].result()) for m in methods}


@pytest.mark.parametrize("method", EQUIVALENCE_METHODS)
def test_flower_sim_and_local_give_the_embedded_bits(flower_runs, method):
    """Same config and seed: identical run folders (but wall-clock fields) on all three engines;
    flower-local runs 2 SuperNodes for 2 rounds in < 3 min, leaves no process behind, and the
    bytes Flower carried match our counted bytes up to the key names."""
    if method not in flower_runs:
        pytest.skip(f"method {method} is not registered yet")
    tmp_path, emb, sim, local = flower_runs[method]
    loc, elapsed, feds, seen = local["summary"], local["elapsed"], local["feds"], local["seen"]
    assert loc["status"] == sim["status"] == emb["status"] == "completed"
    assert emb["model_sha256"] == sim["model_sha256"] == loc["model_sha256"]
    model = (tmp_path / "embedded" / "model.safetensors").read_bytes()
    ref_metrics = _strip(_metrics(tmp_path / "embedded"))
    ref_summary = _strip(json.loads((tmp_path / "embedded" / "summary.json").read_text()))
    ref_cfg = json.loads((tmp_path / "embedded" / "config.json").read_text())
    for name in ("sim", "local"):
        d = tmp_path / name
        assert _strip(_metrics(d)) == ref_metrics, name
        assert _strip(json.loads((d / "summary.json").read_text())) == ref_summary, name
        assert (d / "model.safetensors").read_bytes() == model
        assert (d / "mask.safetensors").read_bytes() == (tmp_path / "embedded" / "mask.safetensors").read_bytes()
        conf = json.loads((d / "config.json").read_text())
        assert {k for k in conf if conf[k] != ref_cfg[k]} == {"engine", "_config_hash"}
        state_files = list((d / "flower-clients").glob("*/client-*/*.safetensors"))
        assert bool(state_files) == (method == "fedskel"), name  # stateless clients write none
    assert ref_summary["failures_total"] == 0 and len(ref_metrics) == 2

    # flower-local: progress followed metrics.jsonl; time; processes
    assert seen == [1, 2]
    assert elapsed < 180
    assert len(feds) == 1 and len(feds[0].supernodes) == 2
    _no_leftovers(feds[0])

    # bytes: what Flower carried for each update is our payload plus the Array key
    lines = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines()]
    rows = _metrics(tmp_path / "local")
    assert len(lines) == sum(len(r["clients"]) for r in rows) == 4
    for ln in lines:
        assert ln["failure"] is None
        assert ln["up_count_bytes"] == ln["up_bytes"] + len("payload")
        assert 0 < ln["up_serialized_bytes"] - ln["up_bytes"] < 1000
        assert ln["down_count_bytes"] - ln["down_bytes"] in (len("payload"), len("payload") + len("setup"))
    for r in rows:
        mine = [ln for ln in lines if ln["round"] == r["round"]]
        assert sum(ln["up_bytes"] for ln in mine) == r["uplink_bytes"]
        assert sum(ln["down_bytes"] for ln in mine) == r["downlink_bytes"]
        assert {c["id"]: c["uplink_bytes"] for c in r["clients"]} == {ln["client"]: ln["up_bytes"] for ln in mine}


def test_a_supernode_killed_mid_round_is_a_recorded_failure(tmp_path):
    """SIGKILL the SuperNode hosting client 3 while its ClientApp trains (round 1 samples clients
    2 and 3, one per node): the round completes with client 2 after the reply wait
    (client_timeout 10 s + grace 10 s), the failure is in metrics.jsonl, the run finishes, and
    nothing is left running. (One round keeps the test short: any later round would wait again
    for the dead node's clients, which the in-process dead-node test covers.)"""
    cfg = _cfg("flower-local", "fedavg", "federation.client_timeout=10", "federation.rounds=1")
    killed: dict[str, int] = {}
    feds: list[LocalFederation] = []

    def node_ids(fed: LocalFederation) -> dict[int, int]:
        out = {}
        for i in range(len(fed.supernodes)):
            text = (fed.logs / f"supernode-{i}.log").read_text(errors="replace")
            for line in text.splitlines():
                if "SuperNode ID:" in line:
                    out[int(line.rsplit(":", 1)[1].strip())] = i
        return out

    def monitor(fed: LocalFederation) -> None:
        if not feds:
            feds.append(fed)
        if killed:
            return
        ids = node_ids(fed)
        if len(ids) < 2:
            return
        victim = fed.supernodes[ids[node_of_client(3, list(ids))]]
        if any(b"flwr-clientapp" in _cmdline(c) for c in descendants(victim.pid)):
            os.kill(victim.pid, signal.SIGKILL)
            killed["pid"] = victim.pid

    s = run_on_flower(cfg, tmp_path / "r", nodes=2, reply_grace=10.0, monitor=monitor, timeout=170)
    assert killed, "the SuperNode of client 3 never ran a ClientApp"
    rows = _metrics(tmp_path / "r")
    (row,) = rows
    assert row["round"] == 1 and s["rounds"] == 1 and s["status"] == "completed"
    assert [c["id"] for c in row["clients"]] == [2] and row["accuracy"] is not None
    (fail,) = row["failures"]
    assert fail["client"] == 3 and fail["injected"] is None
    assert fail["reason"].startswith(("timeout: no reply", "flower error"))
    assert s["failures_total"] == 1
    _no_leftovers(feds[0])


def test_config_shipped_to_flower_is_the_resolved_one():
    cfg = _cfg("flower-sim", "zerofl", "local.lr_end=0.01")
    assert AppOptions.for_experiment(cfg).experiment() == cfg
    assert json.loads(AppOptions.for_experiment(cfg).config_json) == to_dict(cfg)


def _listening_ports(pids) -> set[int]:
    """TCP ports in LISTEN state held by ``pids`` (all processes when None)."""
    inodes = set()
    for pid in pids or []:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and (pids is None or cols[9] in inodes):  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_sigkilled_parent_takes_its_federation_with_it(tmp_path):
    """``kill -9`` of ``sparsefl run --set engine=flower-local`` while round 1 trains: within
    seconds no process of the federation is left (SuperLink, SuperExecs, SuperNodes, ServerApp,
    ClientApps, ``flwr run``, the watchdog), none of its ports is bound, its temporary folder is
    gone, and nothing writes to the run folder any more."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sparsefl.cli.main", "run", "--out", str(out)]
    for o in [*TINY, "federation.rounds=20", "engine=flower-local"]:
        cmd += ["--set", o]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        entry, watchdog = None, None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            kids = descendants(parent.pid)
            watchdog = next((p for p in kids if b"orphans.py" in _cmdline(p)), watchdog)
            for p in kids:
                with contextlib.suppress(OSError):
                    env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
                    entry = next((e for e in env if e.startswith(b"SPARSEFL_FLOWER_SESSION=")), entry)
            if entry is not None and any(b"flwr-clientapp" in _cmdline(p) for p in tree(entry)):
                break
            time.sleep(0.2)
        assert entry is not None and watchdog is not None, "the federation did not start"
        procs = tree(entry)
        assert any(b"flwr-serverapp" in _cmdline(p) for p in procs), "round 1 is not running"
        ports = _listening_ports(procs)
        workdir = Path(_cmdline(watchdog).split(b"\0")[-2].decode())  # the folder it removes
        assert len(ports) >= 3 and workdir.name.startswith("sparsefl-flower-") and workdir.exists()

        parent.send_signal(signal.SIGKILL)
        parent.wait()
        t0 = time.monotonic()

        def gone() -> bool:
            return (
                not tree(entry) and not alive(watchdog) and not ports & _listening_ports(None) and not workdir.exists()
            )

        while not gone() and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        assert not tree(entry), "processes of the federation survived"
        assert not alive(watchdog)
        assert not ports & _listening_ports(None), "ports of the federation are still bound"
        assert not workdir.exists()
        files = {f: f.stat().st_size for f in out.rglob("*") if f.is_file()}
        time.sleep(2)
        assert files == {f: f.stat().st_size for f in out.rglob("*") if f.is_file()}, "the run folder is still written"
    finally:
        parent.kill()
        if entry is not None:
            kill_tree(entry)
