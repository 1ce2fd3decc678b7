"""FedPM (method.name=fedpm): the Beta-posterior aggregation against its formula, the Bernoulli
STE, config validation, and tiny digits runs (learning, determinism, 1-bit uplink, float theta
downlink)."""

from __future__ import annotations

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
from sparsefl.methods.fedmask import bits_to_signs
from sparsefl.methods.fedpm import BernoulliSTE, FedPM
from sparsefl.models import ModelSpec
from sparsefl.protocol.messages import Received, ServerState
from sparsefl.state import clone_state


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(4 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv1(x)).flatten(1))))


SCOPE = ["conv1.weight", "fc1.weight", "fc2.weight"]


def make(*overrides: str) -> FedPM:
    torch.manual_seed(0)
    model = Tiny()
    exp = load_config(overrides=["method.name=fedpm", "method.synflow_iterations=5", "method.sparsity=0.5", *overrides])
    return FedPM(exp.method, exp, ModelSpec(model, (1, 4, 4), 3), profile_model(model, (1, 4, 4)))


def uploads(m: FedPM, state: ServerState, columns: list[list[float]]) -> list[Received]:
    """One client per entry of ``columns[0]``: client ``j`` sends ``columns[i][j]`` at the ``i``-th
    kept position of fc1.weight and 1 everywhere else."""
    assert state.mask is not None
    kept = torch.nonzero(state.mask["fc1.weight"].flatten()).flatten()
    out = []
    for j in range(len(columns[0])):
        vals = {}
        for n in SCOPE:
            b = torch.ones_like(state.params[n])
            if n == "fc1.weight":
                for i, col in enumerate(columns):
                    b.view(-1)[kept[i]] = col[j]
            vals[n] = bits_to_signs(b, state.mask[n])
        out.append(Received(j, Update(values=vals, sent={n: state.mask[n] for n in SCOPE}), 10 + j))
    return out


@pytest.mark.parametrize("estimate", ["mode", "mean"])
def test_aggregate_matches_the_beta_posterior_by_hand(estimate: str) -> None:
    m = make(f"method.estimate={estimate}")
    state = m.init_state(clone_state(m.spec.build().state_dict()))
    assert state.mask is not None
    eps = 0.01
    cols = [[1, 1, 0], [0, 0, 0], [1, 1, 1]]  # three clients at three kept positions
    new = m.aggregate(state, uploads(m, state, cols))
    kept = torch.nonzero(state.mask["fc1.weight"].flatten()).flatten()
    theta = new.extra["theta/fc1.weight"].view(-1)
    for i, col in enumerate(cols):
        ones = sum(col)
        a = 1 + ones * (1 - eps) + (3 - ones) * eps  # prior 1 plus the soft counts, by hand
        b = 1 + ones * eps + (3 - ones) * (1 - eps)
        want = (a - 1) / (a + b - 2) if estimate == "mode" else a / (a + b)
        assert theta[kept[i]].item() == pytest.approx(want, rel=1e-6)
    if estimate == "mode":  # with a uniform prior the mode is the mean of the soft bits
        assert theta[kept[0]].item() == pytest.approx((0.99 + 0.99 + 0.01) / 3, rel=1e-6)
    assert not bool(theta[~state.mask["fc1.weight"].flatten()].any())  # pruned positions stay 0
    assert new.round == state.round + 1


def test_posterior_accumulates_without_reset() -> None:
    m = make("method.reset_prior=false", "method.estimate=mean", "method.prior=2")
    state = m.init_state(clone_state(m.spec.build().state_dict()))
    s1 = m.aggregate(state, uploads(m, state, [[1, 1]]))
    s2 = m.aggregate(s1, uploads(m, s1, [[0, 1]]))
    kept0 = int(torch.nonzero(state.mask["fc1.weight"].flatten())[0])  # type: ignore[index]
    a = 2 + 0.99 + 0.99 + 0.01 + 0.99  # two rounds of observations on the Beta(2, 2) prior
    b = 2 + 0.01 + 0.01 + 0.99 + 0.01
    assert s2.extra["theta/fc1.weight"].view(-1)[kept0].item() == pytest.approx(a / (a + b), rel=1e-6)
    reset = make("method.estimate=mean", "method.prior=2")
    r2 = reset.aggregate(s1, uploads(reset, s1, [[0, 1]]))
    a, b = 2 + 0.01 + 0.99, 2 + 0.99 + 0.01  # reset: only this round's bits
    assert r2.extra["theta/fc1.weight"].view(-1)[kept0].item() == pytest.approx(a / (a + b), rel=1e-6)


@pytest.mark.parametrize("scaled", [True, False])
def test_bernoulli_ste(scaled: bool) -> None:
    theta = torch.tensor([0.0, 1.0, 0.3, 0.8] * 2500, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    x = BernoulliSTE.apply(theta, g, scaled)
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    assert x[0::4].sum().item() == 0 and x[1::4].sum().item() == 2500  # theta 0 and 1 are exact
    assert x[2::4].mean().item() == pytest.approx(0.3, abs=0.04)
    assert x[3::4].mean().item() == pytest.approx(0.8, abs=0.04)
    c = torch.arange(theta.numel(), dtype=torch.float32)
    (c * x).sum().backward()
    want = c * theta.detach() if scaled else c
    assert torch.equal(theta.grad, want)
    # the same generator state gives the same mask: reproducible
    assert torch.equal(BernoulliSTE.apply(theta.detach(), torch.Generator().manual_seed(0), scaled), x.detach())


def test_eval_mask_threshold_and_sample_are_deterministic() -> None:
    m = make("method.eval_mask=threshold")
    state = m.init_state(clone_state(m.spec.build().state_dict()))
    assert state.mask is not None
    ev = m.eval_params(state)
    for k in SCOPE:
        keep = (state.extra[f"theta/{k}"] > 0.5) & state.mask[k]
        assert torch.equal(ev[k] != 0, keep & (state.params[k] != 0))
    s = make()
    st = s.init_state(clone_state(s.spec.build().state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(s.eval_params(st).values(), s.eval_params(st).values()))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.epsilon=0", "method.epsilon"),
        ("method.prior=0.5", "method.prior"),
        ("method.estimate=median", "method.estimate"),
        ("method.eval_mask=vote", "method.eval_mask"),
        ("method.ste=tanh", "method.ste"),
        ("method.score_std=-1", "method.score_std"),
        ("method.score_lr=0", "method.score_lr"),
        ("method.sparsity=1.0", "method.sparsity"),
        ("method.typo=1", "method.typo"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=["method.name=fedpm", override])


# ------------------------------------------------------------------------------------------------
# tiny digits runs
# ------------------------------------------------------------------------------------------------

TINY = [
    "federation.num_clients=6", "federation.clients_per_round=3", "federation.rounds=3",
    "data.min_samples=5", "method.name=fedpm", "local.epochs=3",  # the reference trains 3 local epochs
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, object]:
    tmp = tmp_path_factory.mktemp("fedpm")
    cfg = load_config(overrides=TINY)
    return run_experiment(cfg, tmp / "a"), run_experiment(cfg, tmp / "b"), tmp / "a"


def test_tiny_run_learns_and_is_deterministic(tiny) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = tiny
    assert a["best_accuracy"] > 0.2, a  # 10 classes: chance is 0.1
    assert a["model_sha256"] == b["model_sha256"]
    assert a["density"] <= 0.1 + 1e-3


def test_uplink_one_bit_per_kept_weight_downlink_float_theta(tiny) -> None:  # type: ignore[no-untyped-def]
    _, _, folder = tiny
    m = build(load_config(overrides=TINY)).method
    assert isinstance(m, FedPM)
    state = m.init_state(clone_state(m.spec.build().state_dict()))
    assert state.mask is not None
    kept = sum(int(state.mask[k].sum()) for k in m.roles.scope)
    rest = len(encode_update(Update(values={k: state.params[k] for k in m.roles.per_round}), "float32"))
    bound = kept / 8 + rest + 48 * len(m.roles.scope)  # header, name and 4-byte fingerprint per tensor
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for c in r["clients"]:
            assert kept / 8 <= c["uplink_bytes"] <= bound, (c["uplink_bytes"], kept, rest)
        # theta goes down as float32 on the kept positions: 32 bits each, per client
        assert r["downlink_bytes"] >= 3 * 4 * kept
