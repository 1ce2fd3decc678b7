"""FedMask (method.name=fedmask): HideNseek's frozen init reused, the threshold STE, the majority
rule, config validation, and tiny digits runs (learning, determinism, 1-bit uplink, personal
accuracy)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.accounting import profile_model
from sparsefl.comm import Update, encode_update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.methods.fedmask import FROZEN_INIT, FedMask, FedMaskConfig, ThresholdSTE, bits_to_signs
from sparsefl.methods.hidenseek import HideNseek, HideNseekConfig
from sparsefl.models import ModelSpec
from sparsefl.protocol.messages import Received, ServerState
from sparsefl.state import clone_state


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


SCOPE = ["conv1.weight", "fc1.weight", "fc2.weight"]


def make(name: str, cls: type, *overrides: str):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Tiny()
    exp = load_config(overrides=[f"method.name={name}", "method.synflow_iterations=5", *overrides])
    return cls(exp.method, exp, ModelSpec(model, (1, 4, 4), 3), profile_model(model, (1, 4, 4)))


def test_frozen_init_is_hidenseeks() -> None:
    """Same seed and options: the same frozen W0, the same SynFlow mask, the same setup payload."""
    fm, hs = make("fedmask", FedMask, "method.sparsity=0.7"), make("hidenseek", HideNseek, "method.sparsity=0.7")
    params = clone_state(fm.spec.build().state_dict())
    a, b = fm.init_state(clone_state(params)), hs.init_state(clone_state(params))
    assert a.mask is not None and b.mask is not None
    for k in params:
        assert torch.equal(a.params[k], b.params[k]), k
    for k in SCOPE:
        assert torch.equal(a.mask[k], b.mask[k]), k
    assert a.mask.sparsity() == pytest.approx(b.mask.sparsity())
    # the global mask starts all ones: the global model starts as W0
    ev = fm.eval_params(a)
    assert all(torch.equal(ev[k], a.params[k]) for k in SCOPE)


def test_frozen_init_options_are_hidenseeks() -> None:
    mine = {f.name: f for f in dataclasses.fields(FedMaskConfig)}
    theirs = {f.name: f for f in dataclasses.fields(HideNseekConfig)}
    for n in FROZEN_INIT:
        assert (mine[n].default, mine[n].metadata) == (theirs[n].default, theirs[n].metadata), n


@pytest.mark.parametrize("through", [True, False])
def test_threshold_ste_hand_check(through: bool) -> None:
    s = torch.tensor([0.5, -0.5, 0.0, 2.0], requires_grad=True)
    m = ThresholdSTE.apply(s, through)
    assert m.tolist() == [1.0, 0.0, 0.0, 1.0]  # 1[sigmoid(s) > 0.5]: s = 0 is dropped
    c = torch.tensor([1.0, -2.0, 3.0, 0.5])
    (c * m).sum().backward()
    p = torch.sigmoid(s.detach())
    want = c * p * (1 - p) if through else c
    assert torch.allclose(s.grad, want)


def test_majority_rule_weighted_with_ties_keeping_the_previous_bit() -> None:
    m = make("fedmask", FedMask, "method.sparsity=0.5")
    state = m.init_state(clone_state(m.spec.build().state_dict()))
    assert state.mask is not None
    k = "fc1.weight"
    kept = torch.nonzero(state.mask[k].flatten()).flatten()[:3].tolist()
    prev = state.extra[f"gmask/{k}"].clone()
    prev.view(-1)[kept[2]] = 0.0  # a previous 0, to see a tie keep it
    state = ServerState(state.round, state.params, state.mask, {**state.extra, f"gmask/{k}": prev})

    def up(bits: dict[int, float]) -> Update:
        vals = {}
        for n in SCOPE:
            b = torch.ones_like(state.params[n])
            if n == k:
                for i, v in bits.items():
                    b.view(-1)[i] = v
            vals[n] = bits_to_signs(b, state.mask[n])
        vals.update({n: state.params[n].clone() for n in m.roles.per_round})
        return Update(values=vals, sent={n: state.mask[n] for n in SCOPE})

    a, b, c = kept
    rec = [
        Received(0, up({a: 0.0, b: 0.0, c: 1.0}), 10),  # 10 samples say 0 at a and b
        Received(1, up({a: 1.0, b: 1.0, c: 0.0}), 6),
        Received(2, up({a: 1.0, b: 0.0, c: 0.0}), 4),
    ]
    g = m.aggregate(state, rec).extra[f"gmask/{k}"].view(-1)
    assert g[a].item() == 1.0  # 10 samples say 0, 6 + 4 say 1: a tie keeps the previous 1
    assert g[b].item() == 0.0  # 14 say 0, 6 say 1
    assert g[c].item() == 0.0  # 10 say 1, 10 say 0: a tie keeps the previous 0
    rec[2] = Received(2, up({a: 1.0, b: 0.0, c: 0.0}), 5)
    g = m.aggregate(state, rec).extra[f"gmask/{k}"].view(-1)
    assert (g[a].item(), g[c].item()) == (1.0, 0.0)  # 11 vs 10 say 1 at a; 11 vs 10 say 0 at c


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.score_lr=0", "method.score_lr"),
        ("method.score_init=-1", "method.score_init"),
        ("method.ste=tanh", "method.ste"),
        ("method.sparsity=1.0", "method.sparsity"),
        ("method.weight_init=xavier", "method.weight_init"),
        ("method.personalize=maybe", "method.personalize"),
        ("method.typo=1", "method.typo"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=["method.name=fedmask", override])


# ------------------------------------------------------------------------------------------------
# tiny digits runs
# ------------------------------------------------------------------------------------------------

TINY = [
    "federation.num_clients=6", "federation.clients_per_round=3", "federation.rounds=3",
    "data.min_samples=5", "method.name=fedmask", "data.val_fraction=0.2",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, object]:
    tmp = tmp_path_factory.mktemp("fedmask")
    cfg = load_config(overrides=TINY)
    return run_experiment(cfg, tmp / "a"), run_experiment(cfg, tmp / "b"), tmp / "a"


def test_tiny_run_learns_and_is_deterministic(tiny) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = tiny
    assert a["best_accuracy"] > 0.2, a  # 10 classes: chance is 0.1
    assert a["model_sha256"] == b["model_sha256"]
    assert a["density"] <= 0.1 + 1e-3  # at most the SynFlow mask: the learned mask only drops more


def test_personal_accuracy_reported(tiny) -> None:  # type: ignore[no-untyped-def]
    _, _, folder = tiny
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all(r["personal_accuracy"] is not None and 0 <= r["personal_accuracy"] <= 1 for r in rows)
    assert all("val_accuracy" in c for r in rows for c in r["clients"])


def test_uplink_is_one_bit_per_kept_weight_plus_overhead(tiny) -> None:  # type: ignore[no-untyped-def]
    _, _, folder = tiny
    m = build(load_config(overrides=TINY)).method
    assert isinstance(m, FedMask)
    state = m.init_state(clone_state(m.spec.build().state_dict()))
    assert state.mask is not None
    kept = sum(int(state.mask[k].sum()) for k in m.roles.scope)
    # what is sent besides the bits: the per-round BatchNorm statistics, at most float32 each
    rest = len(encode_update(Update(values={k: state.params[k] for k in m.roles.per_round}), "float32"))
    bound = kept / 8 + rest + 48 * len(m.roles.scope)  # header, name and 4-byte fingerprint per tensor
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for c in r["clients"]:
            assert kept / 8 <= c["uplink_bytes"] <= bound, (c["uplink_bytes"], kept, rest)
