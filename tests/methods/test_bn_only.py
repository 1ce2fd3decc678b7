"""BatchNorm-only training: frozen tensors stay bit-identical, only BN tensors travel, FLOPs skip
frozen weight gradients, config validation, and accuracy above chance on digits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sparsefl.comm import decode_update, encode_update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.methods.bn_only import split_tensors
from sparsefl.protocol.messages import ClientData, ClientTask
from sparsefl.runtime.client import param_spec, run_client

TINY = ["federation.num_clients=6", "federation.clients_per_round=3", "data.min_samples=5"]
BN = {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
STATS = {f"bn{i}.{b}" for i in (1, 2) for b in ("running_mean", "running_var", "num_batches_tracked")}


def test_split_and_init():
    b = build(load_config(overrides=[*TINY, "method.name=bn_only"]))
    trained, buffers, frozen = split_tensors(b.method.new_model(), False)
    assert set(trained) == BN and set(buffers) == STATS
    assert set(frozen) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert set(split_tensors(b.method.new_model(), True)[0]) == BN | {"fc2.weight", "fc2.bias"}
    params = b.method.new_model().state_dict()
    st = b.method.init_state(dict(params))
    g = st.params["bn2.weight"]
    assert (g >= 0).all() and (g < 1).all() and g.std() > 0.1 and torch.count_nonzero(st.params["bn2.bias"]) == 0
    assert torch.equal(st.params["conv2.weight"], params["conv2.weight"])
    assert torch.equal(b.method.init_state(dict(params)).params["bn2.weight"], g)  # seeded
    fixed = build(load_config(overrides=[*TINY, "method.name=bn_only", "method.bn_init=fixed"])).method
    assert torch.equal(fixed.init_state(dict(params)).params["bn1.weight"], torch.ones(32))
    keep = build(load_config(overrides=[*TINY, "method.name=bn_only", "method.bn_init=keep"])).method
    assert torch.equal(keep.init_state(dict(params)).params["bn1.weight"], params["bn1.weight"])


def test_client_round_uploads_only_bn_and_freezes_the_rest():
    b = build(load_config(overrides=[*TINY, "method.name=bn_only", "method.train_classifier=true"]))
    m = b.method
    state = m.init_state(m.new_model().state_dict())
    spec = param_spec(m.new_model())
    setup = encode_update(m.setup_payload(state), "auto")
    task = ClientTask(1, 0, encode_update(m.broadcast(state), "auto"), 0.1, setup)
    idx = torch.as_tensor(b.split.train[0])
    data = ClientData(b.data.x_train[idx], b.data.y_train[idx])
    res = run_client(task, m, data, {})
    up = decode_update(res.payload, spec)
    assert set(up.values) == BN | STATS | {"fc2.weight", "fc2.bias"}
    assert not torch.equal(up.values["bn1.weight"], state.params["bn1.weight"])  # it trained
    assert set(k for k in res.state if k.startswith("frozen/")) == {f"frozen/{k}" for k in m.frozen}
    # FLOPs: frozen layers compute no weight gradient; the classifier does
    prof = m.profile
    per = sum(2 * lay.macs * (1 + (lay.name == "fc2.weight") + (0 if lay.first else 1)) for lay in prof.layers)
    assert res.flops == pytest.approx(per * int(res.flops_dense / prof.dense_train()))
    # the next round (no setup) still works from the client's stored frozen tensors
    task2 = ClientTask(2, 0, encode_update(m.broadcast(state), "auto"), 0.1, None)
    assert run_client(task2, m, data, res.state).num_examples == len(idx)


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.bn_init='gaussian'", "method.bn_init"),
        ("method.train_classifier=1", "method.train_classifier"),
        ("method.sparsity=0.5", "method.sparsity"),
        ("method.bn_lr=0.1", "method.bn_lr"),
    ],
)
def test_config_validation(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method.name=bn_only", override])
    assert e.value.key == key


def test_digits_frozen_unchanged_bytes_and_accuracy(tmp_path):
    over = [
        "federation.num_clients=20",
        "federation.clients_per_round=10",
        "federation.rounds=20",
        "data.alpha=0.5",
        "method.name=bn_only",
        "method.bn_init=fixed",
        "local.epochs=3",
        "local.lr=0.2",
    ]
    cfg = load_config(overrides=over)
    s = run_experiment(cfg, tmp_path / "bn")
    init = build(cfg).spec.build().state_dict()
    final = load_file(str(tmp_path / "bn" / "model.safetensors"))
    for k in ("conv1.weight", "conv2.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(final[k], init[k]), k  # bit-identical to the initialisation
    assert not torch.equal(final["bn2.weight"], torch.ones(64))
    rows = [json.loads(x) for x in (tmp_path / "bn" / "metrics.jsonl").read_text().splitlines()]
    # uplink per client: the BN tensors only (~1.6 kB of a ~213 kB model)
    assert max(c["uplink_bytes"] for r in rows for c in r["clients"]) < 3000
    assert s["final_accuracy"] > 0.2, s["final_accuracy"]  # chance is 0.1
