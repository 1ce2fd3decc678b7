"""BatchNorm-only training: Kaiming-normal frozen weights drawn from the seed, frozen tensors stay
bit-identical, only BN tensors travel, FLOPs skip frozen weight gradients, the random-parameter
control trains only its chosen entries, config validation, and accuracy on digits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sparsefl.comm import decode_update, encode_update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.methods.bn_only import random_entries, split_tensors
from sparsefl.protocol.messages import ClientData, ClientTask, Received
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
    again = b.method.init_state(dict(params))
    assert torch.equal(again.params["bn2.weight"], g) and torch.equal(
        again.params["conv2.weight"], st.params["conv2.weight"]
    )
    # frozen weights: Kaiming normal, std sqrt(2 / fan_in) (open_lth), not the model's uniform init
    for k, fan_in in (("conv2.weight", 32 * 9), ("fc1.weight", st.params["fc1.weight"].shape[1])):
        w = st.params[k]
        assert abs(float(w.std()) / math.sqrt(2 / fan_in) - 1) < 0.1, k
        assert abs(float(w.mean())) < 0.1 * math.sqrt(2 / fan_in), k
        assert float(w.std()) > 2 * float(params[k].std()), k  # the default init is ~2.45x smaller
    assert torch.equal(st.params["fc1.bias"], params["fc1.bias"])  # biases keep the model's init
    other = build(load_config(overrides=[*TINY, "method.name=bn_only", "seed=1"])).method.init_state(dict(params))
    assert not torch.equal(other.params["conv2.weight"], st.params["conv2.weight"])
    model_init = build(load_config(overrides=[*TINY, "method.name=bn_only", "method.weight_init=model"])).method
    assert torch.equal(model_init.init_state(dict(params)).params["conv2.weight"], params["conv2.weight"])
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
        ("method.bn_lr=0", "method.bn_lr"),
        ("method.weight_init='xavier'", "method.weight_init"),
        ("method.trained='all'", "method.trained"),
        ("method.lr=0.1", "method.lr"),
    ],
)
def test_config_validation(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method.name=bn_only", override])
    assert e.value.key == key


def test_bn_lr_scales_the_step_exactly():
    """``bn_lr`` is the trained tensors' learning rate: one plain SGD step at local.lr=0.1 with
    bn_lr=0.4 moves them as local.lr=0.4 with bn_lr=0.4 does (no momentum, no weight decay)."""
    out = []
    for lr in (0.1, 0.4):
        over = [*TINY, "method.name=bn_only", "method.bn_lr=0.4", f"local.lr={lr}", "local.momentum=0"]
        b = build(load_config(overrides=[*over, "local.weight_decay=0", "local.steps=1"]))
        m = b.method
        state = m.init_state(m.new_model().state_dict())
        task = ClientTask(
            1, 0, encode_update(m.broadcast(state), "auto"), lr, encode_update(m.setup_payload(state), "auto")
        )
        idx = torch.as_tensor(b.split.train[0])
        res = run_client(task, m, ClientData(b.data.x_train[idx], b.data.y_train[idx]), {})
        out.append(decode_update(res.payload, param_spec(m.new_model())).values["bn1.weight"])
    assert torch.allclose(out[0], out[1], atol=1e-6)


def test_random_control_trains_only_its_entries():
    over = [*TINY, "method.name=bn_only", "method.trained=random"]
    b = build(load_config(overrides=over))
    m = b.method
    model = m.new_model()
    ent = random_entries(model, 0)
    assert set(ent) == {"conv1.weight", "conv2.weight"}  # convolutions only
    for k, idx in ent.items():
        w = model.get_parameter(k)
        assert idx.numel() == 2 * w.shape[0]  # two per output channel ...
        assert torch.equal((idx // w[0].numel()).bincount(minlength=w.shape[0]), torch.full((w.shape[0],), 2))
        assert idx.unique().numel() == idx.numel()  # ... distinct
        assert torch.equal(random_entries(model, 0)[k], idx)  # a pure function of the seed
    # as many trained values as BN-only trains (every conv here feeds a BatchNorm)
    assert sum(i.numel() for i in ent.values()) == sum(model.get_parameter(k).numel() for k in BN)
    assert m.trained == [] and set(BN) <= set(m.frozen)
    state = m.init_state(model.state_dict())
    spec = param_spec(m.new_model())
    setup = encode_update(m.setup_payload(state), "auto")
    task = ClientTask(1, 0, encode_update(m.broadcast(state), "auto", known=m.entry_masks), 0.1, setup)
    idx = torch.as_tensor(b.split.train[0])
    res = run_client(task, m, ClientData(b.data.x_train[idx], b.data.y_train[idx]), {})
    up = decode_update(res.payload, spec, known=m.entry_masks)
    assert set(up.values) == STATS | set(ent)
    for k, mask in m.entry_masks.items():
        assert torch.equal(up.sent[k], mask)
        assert not torch.equal(up.values[k][mask], state.params[k][mask])  # the entries trained
    # the server averages the chosen entries only; everything else stays as it was
    new = m.aggregate(state, [Received(0, up, 10)])
    for k, mask in m.entry_masks.items():
        assert torch.equal(new.params[k][~mask], state.params[k][~mask])
        assert torch.equal(new.params[k][mask], up.values[k][mask])
    for k in BN:
        assert torch.equal(new.params[k], state.params[k])  # BatchNorm affine frozen in the control


def _digits(*extra: str) -> list[str]:
    """The review setting: digits, 20 clients, 10 a round, Dirichlet 0.5, 30 rounds, 1 local epoch."""
    fed = ["federation.num_clients=20", "federation.clients_per_round=10", "federation.rounds=30"]
    return [*fed, "data.alpha=0.5", "method.name=bn_only", *extra]


def test_digits_frozen_unchanged_bytes_and_accuracy(tmp_path):
    """Documented defaults on the digits cnn (192 BatchNorm parameters): measured 0.560."""
    cfg = load_config(overrides=_digits())
    s = run_experiment(cfg, tmp_path / "bn")
    b = build(cfg)
    init = b.method.init_state(b.spec.build().state_dict()).params
    final = load_file(str(tmp_path / "bn" / "model.safetensors"))
    for k in ("conv1.weight", "conv2.weight", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(final[k], init[k]), k  # bit-identical to the (Kaiming) initialisation
    assert not torch.equal(final["bn2.weight"], init["bn2.weight"])
    rows = [json.loads(x) for x in (tmp_path / "bn" / "metrics.jsonl").read_text().splitlines()]
    # uplink per client: the BN tensors only (~1.6 kB of a ~213 kB model)
    assert max(c["uplink_bytes"] for r in rows for c in r["clients"]) < 3000
    assert s["final_accuracy"] > 0.45, s["final_accuracy"]  # chance is 0.1


@pytest.mark.slow
def test_resnet20_digits_reaches_075(tmp_path):
    """BN-only on resnet20 (1,568 BatchNorm parameters) at the documented defaults: >= 0.75."""
    s = run_experiment(load_config(overrides=_digits("model.name=resnet20")), tmp_path / "r20")
    assert s["final_accuracy"] >= 0.75, s["final_accuracy"]
