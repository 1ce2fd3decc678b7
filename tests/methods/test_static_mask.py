"""Static-mask FedAvg (method.name=static_mask): masked local SGD, exact densities, mask transport
and bytes, score sources, the gradual schedule, config validation, and (slow) the 98% comparison
of SynFlow, ProsPr and Global MP against random pruning (benchmarks/static_mask_98.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.accounting import profile_model
from sparsefl.comm import Update, decode_update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.masks import Mask
from sparsefl.methods.static_mask import StaticMask, StaticMaskConfig, StaticMaskHooks
from sparsefl.models import ModelSpec
from sparsefl.protocol.messages import Received
from sparsefl.pruning import gradual_sparsity, prune
from sparsefl.pruning.allocation import num_kept
from sparsefl.runtime.client import ClientDataSource, param_spec, run_client
from sparsefl.runtime.server import Server

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import tiny_overrides  # noqa: E402


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_method(rounds: int = 3, **cfg: object) -> StaticMask:
    torch.manual_seed(0)
    model = Tiny()
    exp = load_config(
        overrides=[
            "method.name=static_mask",
            f"federation.rounds={rounds}",
            *(f"method.{k}={v}" for k, v in cfg.items()),
        ]
    )
    assert isinstance(exp.method, StaticMaskConfig)
    return StaticMask(exp.method, exp, ModelSpec(model, (1, 4, 4), 3), profile_model(model, (1, 4, 4)))


def tiny_run(tmp: Path, name: str, **extra: object) -> tuple[dict[str, Any], Path]:
    cfg = load_config(overrides=tiny_overrides(**extra))
    return run_experiment(cfg, tmp / name), tmp / name


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.criterion=nope", "method.criterion"),
        ("method.score_source=nope", "method.score_source"),
        ("method.schedule=nope", "method.schedule"),
        ("method.sparsity=1.0", "method.sparsity"),
        ("method.prune_every=0", "method.prune_every"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method.name=static_mask", override])
    assert e.value.key == key


def test_config_cross_checks() -> None:
    with pytest.raises(ConfigError) as e:  # gradual re-prunes by magnitude
        load_config(overrides=["method.name=static_mask", "method.schedule=gradual", "method.criterion=synflow"])
    assert e.value.key == "method.criterion"
    with pytest.raises(ConfigError) as e:  # federated averaging needs per-weight scores
        load_config(
            overrides=["method.name=static_mask", "method.score_source=federated", "method.criterion=skeletonization"]
        )
    assert e.value.key == "method.criterion"
    with pytest.raises(ConfigError) as e:
        make_method(rounds=3, schedule="gradual", prune_until=5)
    assert e.value.key == "method.prune_until"
    d = load_config(overrides=["method.name=static_mask"]).method
    assert (d.criterion, d.score_source, d.schedule, d.sparsity) == ("global_magnitude", "server", "oneshot", 0.9)


# ------------------------------------------------------------------------------------------------
# hooks and server pieces
# ------------------------------------------------------------------------------------------------


def test_hooks_keep_removed_weights_exactly_zero_under_momentum_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = Tiny()
    profile = profile_model(model, (1, 4, 4))
    mask = prune(model, "random", 0.7, data=(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)), seed=3)
    hooks = StaticMaskHooks(model, profile, dict(mask.items()))
    kept_before = {n: model.state_dict()[n][mask[n]].clone() for n in mask}
    opt = torch.optim.SGD(hooks.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for step in range(5):
        x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        hooks.loss(hooks.forward(x), y, x).backward()
        hooks.after_backward(step)
        for n in mask:
            assert bool((dict(model.named_parameters())[n].grad[~mask[n]] == 0).all())
        opt.step()
        hooks.after_step(step)
        for n in mask:
            w = model.state_dict()[n]
            assert bool((w[~mask[n]] == 0).all())
    for n in mask:  # the kept weights did train
        assert not torch.equal(model.state_dict()[n][mask[n]], kept_before[n])
    dens = hooks.densities()
    for n in mask:
        d = float(mask[n].float().mean())
        assert (dens[n].forward, dens[n].grad_input, dens[n].grad_weight) == (d, d, d)


def test_init_exact_density_eval_masked_and_downlink_kept_values_only() -> None:
    m = make_method(sparsity=0.8)
    params = {k: v.clone() for k, v in m.spec.build().state_dict().items()}
    state = m.init_state(params, None)  # global_magnitude is data-free: no proxy needed
    assert state.mask is not None and m.transport == "setup"
    assert state.mask.num_kept() == num_kept(state.mask.numel(), 0.8)
    ev = m.eval_params(state)
    for n, mk in state.mask.items():
        assert bool((ev[n][~mk] == 0).all())
    down = m.broadcast(state)
    assert m.downlink(state, 5) is None  # every client gets the broadcast, encoded once per round
    assert set(down.sent) == set(state.mask) and m.known_masks(m.setup_payload(state)).keys() == set(state.mask)
    setup = m.setup_payload(state)
    assert setup is not None and all(torch.equal(setup.sent[n], state.mask[n]) for n in state.mask)


def test_setup_sent_once_and_known_masks_shrink_both_links(tmp_path: Path) -> None:
    cfg = load_config(overrides=tiny_overrides(**{"method.name": "static_mask", "method.sparsity": 0.9}))
    b = build(cfg)
    m = b.method
    params = {k: v.clone() for k, v in b.spec.build().state_dict().items()}
    state = m.init_state(params, (b.data.x_train[:256], b.data.y_train[:256]))
    server = Server(cfg, m, engine=None, x_test=b.data.x_test, y_test=b.data.y_test)  # type: ignore[arg-type]
    tasks = server.make_tasks(state, 1, [0, 1])
    assert all(t.setup is not None for t in tasks)
    server.setup_of.update(dict.fromkeys((0, 1), server.setup_version(state)))
    again = server.make_tasks(state, 2, [0, 1, 2])
    assert again[0].setup is None and again[1].setup is None and again[2].setup is not None
    # the client trains, keeps removed weights at 0 and uploads only the kept values
    res = run_client(tasks[0], m, ClientDataSource(b.data.x_train, b.data.y_train, b.split)(0), {})
    up = decode_update(res.payload, param_spec(b.spec.build()), known=m.known_masks(m.setup_payload(state)))
    assert state.mask is not None
    for n, mk in state.mask.items():
        assert torch.equal(up.sent[n], mk) and bool((up.values[n][~mk] == 0).all())
    assert any(not torch.equal(up.values[n], state.params[n]) for n in state.mask)  # it trained
    # bytes against dense FedAvg at 90%: kept values + 4-byte fingerprints, well under 0.2
    dense_cfg = load_config(overrides=tiny_overrides())
    db = build(dense_cfg)
    dserver = Server(dense_cfg, db.method, engine=None, x_test=db.data.x_test, y_test=db.data.y_test)  # type: ignore[arg-type]
    dstate = db.method.init_state(params)
    dtask = dserver.make_tasks(dstate, 1, [0])[0]
    dres = run_client(dtask, db.method, ClientDataSource(db.data.x_train, db.data.y_train, db.split)(0), {})
    assert len(again[0].payload) < 0.2 * len(dtask.payload)
    assert res.uplink_bytes < 0.2 * dres.uplink_bytes
    assert res.flops < 0.2 * res.flops_dense


def test_mask_file_replaces_the_criterion_and_is_checked(tmp_path: Path) -> None:
    """``method.mask_file``: its mask, exactly (scope weights it leaves out stay dense); a file
    that does not fit the model is refused naming the key; the server needs the file, a client
    building the method without it does not."""
    from safetensors.torch import save_file

    conv = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0)) > 0.5
    Mask({"conv.weight": conv}).save(tmp_path / "m.safetensors")
    m = make_method(mask_file=str(tmp_path / "m.safetensors"), criterion="snip", score_source="client")
    assert not m.client_scored and m.transport == "setup"  # the file, not a scoring round, gives the mask
    params = {k: v.clone() for k, v in m.spec.build().state_dict().items()}
    state = m.init_state(params, None)
    assert state.mask == {"conv.weight": conv, "fc.weight": torch.ones(3, 64, dtype=torch.bool)}
    assert bool((state.params["conv.weight"][~conv] == 0).all())

    for content, match in (
        ({"bn.weight": torch.ones(4, dtype=torch.bool)}, "prunable weights"),
        ({"conv.weight": torch.ones(4, 1, 5, 5, dtype=torch.bool)}, "shaped"),
        ({"conv.weight": torch.full((4, 1, 3, 3), 0.5)}, "0/1"),
    ):
        save_file(content, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ConfigError, match=f"method.mask_file.*{match}"):
            make_method(mask_file=str(tmp_path / "bad.safetensors"))
    missing = make_method(mask_file=str(tmp_path / "missing.safetensors"))  # a client elsewhere
    with pytest.raises(ConfigError, match="method.mask_file.*an existing mask.safetensors"):
        missing.init_state(params, None)  # the server
    with pytest.raises(ConfigError, match="method.mask_file.*oneshot"):
        make_method(mask_file=str(tmp_path / "m.safetensors"), schedule="gradual")


def test_gradual_schedule_monotone_and_reaches_target_at_prune_until() -> None:
    m = make_method(rounds=8, schedule="gradual", sparsity=0.9, prune_every=2, prune_until=5)
    params = {k: v.clone() for k, v in m.spec.build().state_dict().items()}
    state = m.init_state(params)
    assert state.mask is not None and state.mask.num_kept() == state.mask.numel()
    assert m.transport == "setup" and m.setup_payload(state) is not None
    g = torch.Generator().manual_seed(0)
    kept = []
    for _ in range(8):
        noisy = {
            k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in state.params.items()
        }
        prev = state.mask
        state = m.aggregate(state, [Received(0, Update(values=noisy), 10)])
        assert state.mask is not None
        assert all(bool((state.mask[n] <= prev[n]).all()) for n in prev)  # monotone: only shrinks
        for n, mk in state.mask.items():
            assert bool((state.params[n][~mk] == 0).all())
        kept.append(state.mask.num_kept())
    n = state.mask.numel()
    expect = []
    cur = n
    for r in range(1, 9):
        if r <= 5 and (r % 2 == 0 or r == 5):
            cur = min(cur, num_kept(n, gradual_sparsity(r, 5, 0.9)))
        expect.append(cur)
    assert kept == expect
    assert kept[4] == num_kept(n, 0.9) and kept[-1] == kept[4]  # target at prune_until, then fixed


# ------------------------------------------------------------------------------------------------
# end to end (tiny digits runs)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], Path]]:
    tmp = tmp_path_factory.mktemp("static_mask")
    sm = {"method.name": "static_mask", "method.sparsity": 0.9}
    return {
        "fedavg": tiny_run(tmp, "fedavg"),
        "server": tiny_run(tmp, "server", **sm),
        "client": tiny_run(tmp, "client", **sm, **{"method.criterion": "snip", "method.score_source": "client"}),
        "federated": tiny_run(tmp, "fed", **sm, **{"method.criterion": "snip", "method.score_source": "federated"}),
        "gradual": tiny_run(tmp, "gradual", **sm, **{"method.schedule": "gradual", "method.prune_until": 2}),
    }


@pytest.mark.parametrize("name", ["server", "client", "federated", "gradual"])
def test_e2e_exact_density_and_zero_removed_weights(runs: dict[str, Any], name: str) -> None:
    summary, folder = runs[name]
    mask = Mask.load(folder / "mask.safetensors")
    assert mask.num_kept() == num_kept(mask.numel(), 0.9)  # exact: 1 - sparsity within one weight
    assert abs(summary["density"] - 0.1) * mask.numel() <= 1
    assert summary["rounds"] == 3 and summary["final_accuracy"] > 0.2


def test_e2e_uplink_and_downlink_bytes_vs_fedavg(runs: dict[str, Any]) -> None:
    dense = runs["fedavg"][0]
    server = runs["server"][0]
    assert server["uplink_bytes_total"] < 0.2 * dense["uplink_bytes_total"]
    assert server["downlink_bytes_total"] < 0.2 * dense["downlink_bytes_total"]  # setup once per client included
    # client/federated: the scoring round uploads one mask / everyone's scores; the mask then
    # travels with every message (message transport), still far below dense
    assert runs["client"][0]["uplink_bytes_total"] < 0.2 * dense["uplink_bytes_total"]
    assert runs["federated"][0]["uplink_bytes_total"] < 0.5 * dense["uplink_bytes_total"]
    assert runs["client"][0]["uplink_bytes_total"] < runs["federated"][0]["uplink_bytes_total"]


def test_e2e_scoring_round_trains_nothing_and_masks_from_round_1(runs: dict[str, Any]) -> None:
    import json

    for name in ("client", "federated"):
        folder = runs[name][1]
        recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if len(recs) == 1 and isinstance(recs[0], list):
            recs = recs[0]
        assert recs[0]["train_flops"] == 0  # the scoring round
        assert recs[1]["train_flops"] > 0 and recs[1]["train_flops"] < 0.2 * recs[1]["train_flops_dense"]


# ------------------------------------------------------------------------------------------------
# slow: the 98% comparison (also benchmarks/static_mask_98.py)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_98_percent_criteria_beat_random(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("static_mask_98", ROOT / "benchmarks" / "static_mask_98.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run_all([0], 30, tmp_path)
    means = bench.mean_final(rows)
    for crit in ("synflow", "prospr", "global_magnitude"):
        assert means[crit] > means["random"], bench.table(rows)


def test_min_keep_fraction_keeps_every_layer_alive_at_the_same_total() -> None:
    # the per-layer floor (Gupta et al.'s MT rule) at the same global total
    masks = []
    for extra in ({}, {"min_keep_fraction": 0.025}):
        m = make_method(sparsity=0.95, **extra)
        masks.append(m.init_state({k: v.clone() for k, v in m.spec.build().state_dict().items()}).mask)
    plain, floored = masks
    assert plain is not None and floored is not None
    assert floored.num_kept() == plain.num_kept()
    floor = int(0.025 * floored.numel())
    assert min(int(v.sum()) for v in floored.values()) >= floor > min(int(v.sum()) for v in plain.values())
    with pytest.raises(ConfigError, match="method.min_keep_fraction"):
        make_method(criterion="skeletonization", min_keep_fraction=0.01)
