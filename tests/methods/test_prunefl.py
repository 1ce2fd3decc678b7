"""PruneFL (method.name=prunefl): options, the registry listing, the greedy rule and the time model
(hand-computed oracles), and a 5-round digits run: it learns, the sparsity bound holds, and a
reconfiguration round's uplink carries the dense squared gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.accounting import profile_model
from sparsefl.cli.main import main
from sparsefl.comm import Update, encode_update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import run_experiment
from sparsefl.masks import Mask
from sparsefl.methods.prunefl import greedy_mask, time_costs
from sparsefl.pruning.allocation import num_kept
from sparsefl.registry import METHODS

#: the default digits run for 5 rounds (round 1 prunes), 3 local epochs, one reconfiguration (round 4)
RUN = ["method.name=prunefl", "federation.rounds=5", "local.epochs=3", "method.interval=3"]


@pytest.mark.parametrize(
    "bad",
    [
        "method.sparsity=1",
        "method.sparsity=-0.1",
        "method.max_dec=1.5",
        "method.interval=0",
        "method.fixed_cost=0",
    ],
)
def test_bad_options_are_one_config_error(bad):
    with pytest.raises(ConfigError):
        load_config(overrides=["method.name=prunefl", bad])


def test_listed_by_the_cli_with_its_paper(capsys):
    assert "prunefl" in METHODS.names()
    assert main(["list", "methods"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("prunefl"))
    assert "Jiang" in line


def _greedy(sqg, costs, base_time, mask=None, weights=None, max_dec=1.0, max_keep=100):
    sqg = {n: torch.tensor(v, dtype=torch.float64) for n, v in sqg.items()}
    weights = weights or {n: torch.zeros_like(v) for n, v in sqg.items()}
    got = greedy_mask(sqg, weights, mask, costs, 0.0, base_time, max_dec, max_keep)
    return {n: m.long().tolist() for n, m in got.items()}


def test_greedy_adds_while_the_candidate_beats_the_current_ratio():
    # ratio 0/1: take 9 (9/2 now); 4*(1+1)=8 is not above 9: stop
    assert _greedy({"a": [4.0, 1.0, 0.0, 9.0]}, {"a": 1.0}, 1.0) == {"a": [0, 0, 0, 1]}
    # a larger fixed time keeps more: 9*3 > 0, 4*4 > 9, 1*5 < 13
    assert _greedy({"a": [4.0, 1.0, 0.0, 9.0]}, {"a": 1.0}, 3.0) == {"a": [1, 0, 0, 1]}
    # per unit of time: b's gradients are larger but three times as costly (6/3 = 2 < 4)
    got = _greedy({"a": [4.0, 4.0], "b": [6.0, 6.0]}, {"a": 1.0, "b": 3.0}, 2.0)
    assert got == {"a": [1, 1], "b": [0, 0]}
    # the bound on the kept count
    assert _greedy({"a": [4.0, 1.0, 0.0, 9.0]}, {"a": 1.0}, 100.0, max_keep=2) == {"a": [1, 0, 0, 1]}


def test_greedy_keeps_the_largest_magnitudes_for_sure_and_the_bound_is_hard():
    mask = Mask({"a": torch.tensor([True, True, True, True, False, False])})
    w = {"a": torch.tensor([0.1, -0.5, 0.3, 0.2, 0.0, 0.0])}
    sqg = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # no gradient: nothing is added back
    # max_dec 0.5: the 2 largest |w| (indices 1, 2) stay for sure
    assert _greedy({"a": sqg}, {"a": 1.0}, 1.0, mask, w, max_dec=0.5) == {"a": [0, 1, 1, 0, 0, 0]}
    # a bound below the sure count shrinks it (largest magnitude first)
    assert _greedy({"a": sqg}, {"a": 1.0}, 1.0, mask, w, max_dec=0.0, max_keep=1) == {"a": [0, 1, 0, 0, 0, 0]}


def test_time_costs_follow_the_flop_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    prof = profile_model(model, (1, 8, 8))
    c = time_costs(prof, ["0.weight", "2.weight"], samples=10, comm_per_byte=5.0)
    assert c["2.weight"] == pytest.approx(6.0 * 10 + 8 * 5.0)  # a linear weight: one MAC per sample
    assert c["0.weight"] == pytest.approx(6.0 * 64 * 10 + 8 * 5.0)  # a conv weight: one per position


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_five_rounds_learn_and_a_reconfiguration_uploads_dense_squared_gradients(tmp_path):
    cfg = load_config(overrides=RUN)
    summary = run_experiment(cfg, tmp_path / "run")
    rows = _metrics(tmp_path / "run")
    assert summary["final_accuracy"] > 0.5
    assert summary["density"] < 0.5
    # round 4 reconfigures: each client sends whole tensors, about what a dense update costs
    params = load_file(str(tmp_path / "run" / "model.safetensors"))
    dense = len(
        encode_update(
            Update(values={k: v + 1.0 if v.is_floating_point() else v for k, v in params.items()}), cfg.comm.up
        )
    )
    clients = cfg.federation.clients_per_round
    # (exact zeros, e.g. the squared gradients of dead units, may travel as a support mask)
    assert 0.8 * clients * dense < rows[3]["uplink_bytes"] <= 1.01 * clients * dense
    assert rows[3]["uplink_bytes"] > 2 * rows[2]["uplink_bytes"]


def test_the_sparsity_bound_holds(tmp_path):
    cfg = load_config(overrides=[*RUN, "federation.rounds=2", "method.sparsity=0.9"])
    summary = run_experiment(cfg, tmp_path / "run")
    mask = Mask.load(tmp_path / "run" / "mask.safetensors")
    assert mask.num_kept() <= num_kept(mask.numel(), 0.9)  # N - floor(0.9 N)
    assert summary["density"] == pytest.approx(mask.density())
    assert all(int(m.sum()) >= 1 for m in mask.values())


def test_squared_gradient_rounds_count_the_weight_gradient_dense() -> None:
    """The squared gradients are read at every weight, so that round's weight gradient is
    computed (and counted) whole; the forward stays at the mask's density."""
    from sparsefl.methods.prunefl import SquaredGradHooks

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    mask = {"1.weight": torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) < 0.25}
    sqg = {n: torch.zeros_like(p) for n, p in model.named_parameters()}  # biases too
    hooks = SquaredGradHooks(model, profile_model(model, (16,)), mask, sqg)
    d = hooks.densities()["1.weight"]
    assert d.grad_weight == 1.0 and d.forward == pytest.approx(float(mask["1.weight"].float().mean()))
