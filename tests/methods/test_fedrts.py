"""FedRTS (method.name=fedrts): options, the Beta posteriors on hand-built cases, the Thompson
draw, the server's adjustment at fixed density, and a 5-round digits run at 90% sparsity
(density, accuracy, and the downlink bytes of a mask change)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.accounting import profile_model
from sparsefl.comm import Update, encode_update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runfolder import RunFolder
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.masks import Mask
from sparsefl.methods.fedrts import (
    ALPHA,
    BETA,
    FedRTS,
    FedRTSConfig,
    drop_votes,
    grow_posterior,
    thompson,
    update_drop_posterior,
)
from sparsefl.models import ModelSpec
from sparsefl.protocol.messages import Received
from sparsefl.protocol.sampling import sample_clients
from sparsefl.rng import np_rng


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def make_method(rounds: int = 10, **cfg: object) -> FedRTS:
    torch.manual_seed(0)
    model = Tiny()
    exp = load_config(
        overrides=["method.name=fedrts", f"federation.rounds={rounds}", *(f"method.{k}={v}" for k, v in cfg.items())]
    )
    assert isinstance(exp.method, FedRTSConfig)
    return FedRTS(exp.method, exp, ModelSpec(model, (1, 4, 4), 3), profile_model(model, (1, 4, 4)))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.gamma=1.5", "method.gamma"),
        ("method.ratio=0", "method.ratio"),
        ("method.discount=0", "method.discount"),
        ("method.allocation=nope", "method.allocation"),
        ("method.adjust_every=0", "method.adjust_every"),
        ("method.alpha=1.5", "method.alpha"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method.name=fedrts", override])
    assert e.value.key == key


def test_drop_posterior_on_a_hand_built_case() -> None:
    kept = torch.tensor([True, True, True, False])
    c1 = torch.tensor([0.1, 0.5, -0.9, 0.0])  # smallest kept: index 0
    c2 = torch.tensor([0.6, -0.2, 0.9, 0.0])  # smallest kept: index 1
    glob = torch.tensor([0.3, 0.4, 0.9, 0.0])  # smallest kept: index 0
    v = drop_votes(kept, [c1, c2], [0.25, 0.75], glob, k=1, gamma=0.5)
    # 0.5 * (0.25 [1,0,0,0] + 0.75 [0,1,0,0]) + 0.5 [1,0,0,0]
    assert torch.allclose(v, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64))
    a, b = update_drop_posterior(None, None, v, kept, k=1, ratio=2.0, discount=1.0)
    p = 1 / 3  # the prior drop rate k / kept
    assert torch.allclose(a, torch.tensor([p + 1.25, p + 0.75, p, p], dtype=torch.float64))
    assert torch.allclose(b, torch.tensor([p + 0.75, p + 1.25, p + 2.0, p], dtype=torch.float64))
    # a second round with discount 0.5: evidence above the prior halves, then the new votes add
    v2 = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    a2, b2 = update_drop_posterior(a, b, v2, kept, k=1, ratio=2.0, discount=0.5)
    assert torch.allclose(a2, torch.tensor([p + 0.625, p + 0.375 + 2, p, p], dtype=torch.float64))
    assert torch.allclose(b2, torch.tensor([p + 0.375 + 2, p + 0.625, p + 1 + 2, p], dtype=torch.float64))


def test_grow_posterior_on_a_hand_built_case() -> None:
    kept = torch.tensor([True, False, False, False, False])
    votes = torch.tensor([0.0, 0.5, 0.0, 1.0, 0.0], dtype=torch.float64)
    a, b = grow_posterior(votes, kept, k=1, ratio=2.0)
    q = 1 / 4  # k / removed
    assert torch.allclose(a, torch.tensor([1.0, q + 1.0, q, q + 2.0, q], dtype=torch.float64))
    assert torch.allclose(b, torch.tensor([1.0, q, q + 2 * 3 / 4, q, q + 2 * 3 / 4], dtype=torch.float64))


def test_thompson_draws_are_reproducible_and_follow_the_posterior() -> None:
    a = torch.tensor([50.0, 1.0], dtype=torch.float64)
    b = torch.tensor([1.0, 50.0], dtype=torch.float64)
    t1 = thompson(a, b, np_rng(0, "x"))
    assert torch.equal(t1, thompson(a, b, np_rng(0, "x")))
    many = np.stack([thompson(a, b, np_rng(0, "x", i)).numpy() for i in range(50)])
    assert (many[:, 0] > many[:, 1]).all()


def test_server_adjustment_keeps_density_and_forgets_the_posterior() -> None:
    m = make_method(rounds=10, sparsity=0.5, adjust_every=2, alpha=0.5, adjust_until=1.0)
    params = {k: v.clone() for k, v in m.spec.build().state_dict().items()}
    state = m.init_state(params)
    assert state.mask is not None
    counts = {n: int(t.sum()) for n, t in state.mask.items()}
    gen = torch.Generator().manual_seed(1)

    def upload(cid: int, with_grads: bool) -> Received:
        vals = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.params.items()}
        sent = {}
        for n, mk in state.mask.items():
            vals[n] = vals[n] * mk
            sent[n] = mk.clone()
            if with_grads:  # two reported gradients at removed positions
                where = (~mk).reshape(-1).nonzero().reshape(-1)[:2]
                sent[n].view(-1)[where] = True
                vals[n].view(-1)[where] = 1.0
        return Received(cid, Update(vals, sent), 10)

    s1 = m.aggregate(state, [upload(0, False), upload(1, False)])  # round 1: evidence only
    assert s1.mask == state.mask and {ALPHA + n for n in m.scope} <= set(s1.extra)
    assert m.task_config(s1, [3]) == {3: {"adjust": m._fraction(2)}}
    s2 = m.aggregate(s1, [upload(0, True), upload(1, True)])  # round 2: the Thompson drop-and-grow
    assert s2.mask != s1.mask
    assert {n: int(t.sum()) for n, t in s2.mask.items()} == counts
    assert not any(k.startswith((ALPHA, BETA)) for k in s2.extra)
    for n in m.scope:  # grown weights start at zero, dropped ones are zero
        assert bool((s2.params[n][~s2.mask[n]] == 0).all())
        assert bool((s2.params[n][s2.mask[n] & ~s1.mask[n]] == 0).all())


def test_five_rounds_on_digits_at_90_percent(tmp_path: Path) -> None:
    """Default digits federation (3 local epochs), 5 rounds, the mask redrawn after round 2."""
    cfg = load_config(
        overrides=[
            "method.name=fedrts",
            "method.sparsity=0.9",
            "method.adjust_every=2",
            "federation.rounds=5",
            "local.epochs=3",
        ]
    )
    summary = run_experiment(cfg, tmp_path / "run")
    assert abs(summary["density"] - 0.1) < 0.01
    assert summary["final_accuracy"] > 0.5
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    down = [r["downlink_bytes"] for r in rows]
    # The mask changes at round 2 (T_end = 3): from round 3 on, each sampled client whose copy
    # is the initial mask gets the new one in a setup payload, once; the broadcast carries a
    # 4-byte fingerprint per tensor in every round.
    ckpt = RunFolder(tmp_path / "run").latest_checkpoint()
    assert ckpt is not None
    server = ckpt["server"]
    mask = Mask(server["mask"])
    b = build(cfg)
    init = b.method.init_state(b.spec.build().state_dict()).mask
    assert mask != init
    values, sent = mask.applied(server["params"]), dict(mask.items())
    carried = len(encode_update(Update(values, sent), cfg.comm.down, known=dict(init)))
    fingerprint = len(encode_update(Update(values, sent), cfg.comm.down, known=sent))
    setups = [
        len(encode_update(Update({n: m.float() for n, m in k.items()}, dict(k.items())), cfg.comm.down))
        for k in (init, mask)
    ]
    fed, have, expected = cfg.federation, {}, []
    for r in range(1, 6):
        current = 0 if r <= 2 else 1
        sampled = sample_clients(cfg.seed, r, fed.num_clients, fed.clients_per_round, 0)
        stale = [c for c in sampled if have.get(c) != current]
        expected.append(fed.clients_per_round * fingerprint + len(stale) * setups[current])
        have.update(dict.fromkeys(sampled, current))
    assert down[1:5] == expected[1:5]
    assert carried - fingerprint > 0.1 * mask.num_kept() / 8  # about the mask's entropy-coded size
