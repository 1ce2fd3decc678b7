"""FedTiny (method.name=fedtiny): options, the ABNS candidates and selection, gradient-recording
hooks, and a 5-round digits run at 90% sparsity (density, accuracy, the bytes of each phase)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.accounting import profile_model
from sparsefl.comm import Update, encode_update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import run_experiment
from sparsefl.masks import Mask
from sparsefl.methods.fedtiny import (
    FedTiny,
    FedTinyConfig,
    GradRecordingHooks,
    bn_adapted_loss,
    candidate_masks,
)
from sparsefl.models import ModelSpec
from sparsefl.protocol.messages import Received
from sparsefl.protocol.sampling import sample_clients
from sparsefl.pruning.allocation import num_kept
from sparsefl.pruning.dst import layer_k


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_method(model: nn.Module | None = None, **cfg: object) -> FedTiny:
    torch.manual_seed(0)
    model = model or Tiny()
    exp = load_config(overrides=["method.name=fedtiny", *(f"method.{k}={v}" for k, v in cfg.items())])
    assert isinstance(exp.method, FedTinyConfig)
    return FedTiny(exp.method, exp, ModelSpec(model, (1, 4, 4), 3), profile_model(model, (1, 4, 4)))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.candidates=0", "method.candidates"),
        ("method.candidates=17", "method.candidates"),
        ("method.progressive=nope", "method.progressive"),
        ("method.adjust_every=0", "method.adjust_every"),
        ("method.adjust_until=0", "method.adjust_until"),
        ("method.alpha=0", "method.alpha"),
        ("method.bn_samples=0", "method.bn_samples"),
        ("method.sparsity=1.0", "method.sparsity"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method.name=fedtiny", override])
    assert e.value.key == key


def test_candidate_losses_must_fit_the_first_layer() -> None:
    with pytest.raises(ConfigError) as e:
        make_method(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten(), nn.Linear(16, 3)), candidates=2)
    assert e.value.key == "method.candidates"


def test_candidates_are_exact_distinct_and_rebuilt_identically() -> None:
    m = make_method(candidates=6, sparsity=0.75)
    params = m.spec.build().state_dict()
    a = candidate_masks(params, m.scope, 0.75, 6, seed=0)
    b = candidate_masks({k: v.clone() for k, v in params.items()}, m.scope, 0.75, 6, seed=0)
    assert a == b and len(a) == 6
    for c in a:
        assert c.num_kept() == num_kept(c.numel(), 0.75)
    assert a[1].layer_density() == pytest.approx({n: 0.25 for n in m.scope}, abs=0.02)  # layerwise
    assert a[4] != a[5]  # random candidates differ by seed


def test_bn_adapted_loss_restores_the_model_and_uses_fresh_statistics() -> None:
    torch.manual_seed(1)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(20, 1, 4, 4) * 3 + 2, torch.randint(0, 3, (20,))
    mask = Mask.for_model(model)
    loss = bn_adapted_loss(model, mask, x, y, 8)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same loss by hand: BN statistics of the whole sample, then eval mode
    ref = Tiny()
    ref.load_state_dict(before)
    ref.bn.momentum = None
    ref.bn.reset_running_stats()
    ref.train()
    with torch.no_grad():
        for i in range(0, 20, 8):
            ref(x[i : i + 8])
        ref.eval()
        want = float(nn.functional.cross_entropy(ref(x), y))
    assert loss == pytest.approx(want, rel=1e-5)


def test_abns_selects_the_least_sample_weighted_loss() -> None:
    m = make_method(candidates=3, sparsity=0.5)
    state = m.init_state({k: v.clone() for k, v in m.spec.build().state_dict().items()})
    assert state.mask is None and m.task_config(state, [4, 2]) == {4: {"role": "abns"}, 2: {"role": "abns"}}
    name = m.scope[0]

    def report(cid: int, losses: list[float], n: int) -> Received:
        v = torch.zeros(state.params[name].numel())
        v[:3] = torch.tensor(losses)
        s = torch.zeros(v.numel(), dtype=torch.bool)
        s[:3] = True
        shape = state.params[name].shape
        return Received(cid, Update({name: v.view(shape)}, {name: s.view(shape)}), n)

    # means: (1*3 + 3*1) / 4 = 1.5, (1*1 + 3*2) / 4 = 1.75, (1*2 + 3*1.2) / 4 = 1.4 -> candidate 2
    new = m.aggregate(state, [report(0, [3.0, 1.0, 2.0], 1), report(1, [1.0, 2.0, 1.2], 3)])
    assert int(new.extra["fedtiny.choice"]) == 2 and new.round == 1
    assert new.mask == m._candidates(state.params)[2]
    assert all(torch.equal(new.params[n], state.params[n] * new.mask[n]) for n in m.scope)
    none = m.aggregate(state, [])  # nobody reported: still no mask, ABNS again next round
    assert none.mask is None and m.task_config(none, [1]) == {1: {"role": "abns"}}


def test_grad_recording_hooks_record_the_dense_mean_gradient() -> None:
    torch.manual_seed(0)
    model = Tiny()
    mask = {n: torch.rand(model.state_dict()[n].shape) > 0.5 for n in ("conv.weight", "fc.weight")}
    state: dict[str, torch.Tensor] = {}
    hooks = GradRecordingHooks(model, profile_model(model, (1, 4, 4)), mask, state, record=["fc.weight"])
    opt = torch.optim.SGD(hooks.parameters(), lr=0.1)
    grads = []
    for step in range(3):
        x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        hooks.loss(hooks.forward(x), y, x).backward()
        grads.append(model.fc.weight.grad.clone())
        hooks.after_backward(step)
        assert bool((model.fc.weight.grad[~mask["fc.weight"]] == 0).all())
        opt.step()
    hooks.close()
    assert torch.allclose(state["dst.grad.fc.weight"], sum(grads) / 3, atol=1e-6)
    assert bool((state["dst.grad.fc.weight"][~mask["fc.weight"]] != 0).any())
    assert "dst.grad.conv.weight" not in state
    assert hooks.densities()["fc.weight"].grad_weight == 1.0
    assert hooks.densities()["conv.weight"].grad_weight == pytest.approx(float(mask["conv.weight"].float().mean()))


def test_progressive_layer_cycles_from_last_to_first() -> None:
    m = make_method(progressive="layer", adjust_every=2)
    assert [m._adjusted_layers(r) for r in (2, 4, 6)] == [["fc.weight"], ["conv.weight"], ["fc.weight"]]
    assert make_method()._adjusted_layers(5) == m.scope


def test_five_rounds_on_digits_at_90_percent(tmp_path: Path) -> None:
    """Default digits federation (4 local epochs), 5 rounds: ABNS in round 1, adjustments at
    rounds 2 and 4."""
    cfg = load_config(
        overrides=[
            "method.name=fedtiny",
            "method.sparsity=0.9",
            "method.adjust_every=2",
            "method.adjust_until=1.0",
            "federation.rounds=5",
            "local.epochs=4",
        ]
    )
    summary = run_experiment(cfg, tmp_path / "run")
    assert abs(summary["density"] - 0.1) < 0.01
    assert summary["final_accuracy"] > 0.5
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    up = [r["uplink_bytes"] for r in rows]
    down = [r["downlink_bytes"] for r in rows]
    # ABNS: the dense model goes down, only the candidates' losses come back
    assert up[0] < 100 * cfg.federation.clients_per_round and down[0] > 5 * down[1]
    # adjustment rounds also carry each client's top-K gradients: about 4 bytes per entry more,
    # and the kept-plus-gradient set is no known mask, so it travels encoded (at most a setup)
    mask = Mask.load(tmp_path / "run" / "mask.safetensors")
    setup = len(encode_update(Update({n: m.float() for n, m in mask.items()}, dict(mask.items())), cfg.comm.down))
    for adj, plain in ((1, 2), (3, 4)):
        f = cfg.method.alpha / 2 * (1 + math.cos(math.pi * (adj + 1) / 5))  # T_end = 5
        k = sum(layer_k(f, int(m.sum()), m.numel() - int(m.sum())) for m in mask.values())
        extra = (up[adj] - up[plain]) / cfg.federation.clients_per_round
        assert 4 * k * 0.8 < extra < 4 * k * 2.0 + setup, (adj, extra, k)
    # the mask changes after rounds 1, 2 and 4: each sampled client with an older copy gets the
    # new one in a setup payload, once; round 3 sends it to all, round 4 only to newcomers
    fed = cfg.federation
    sampled = [set(sample_clients(cfg.seed, r, fed.num_clients, fed.clients_per_round, 0)) for r in (3, 4)]
    saved = (fed.clients_per_round - len(sampled[1] - sampled[0])) * setup
    assert saved > 0 and down[2] - down[3] == pytest.approx(saved, rel=0.1, abs=24)
