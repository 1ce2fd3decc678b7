"""Yu et al. dynamic pruning (method.name=dynamic): per-sample gating, zero gradients of suppressed
channels, kept-channel and union-of-gradients uploads, per-coordinate aggregation, FLOPs, the threshold variant,
config validation, and end-to-end runs on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.accounting import profile_model
from sparsefl.comm import Update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import run_experiment
from sparsefl.methods.dynamic import (
    Dynamic,
    DynamicConfig,
    GatedModel,
    ThresholdHooks,
    find_gated_pairs,
    keep_count,
    steps_per_epoch,
)
from sparsefl.models import ModelSpec, build_model
from sparsefl.models.nets import ResNet
from sparsefl.protocol.messages import LocalContext, Received, ServerState
from sparsefl.rng import torch_gen
from sparsefl.runtime.client import train_local

torch.set_num_threads(1)
SHAPE = (1, 8, 8)


def make(*overrides: str, model: str = "cnn") -> Dynamic:
    exp = load_config(overrides=["method.name=dynamic", "local.weight_decay=0", *overrides])
    net = build_model(exp.model.__class__(name=model), SHAPE, 10, 0)
    assert isinstance(exp.method, DynamicConfig)
    return Dynamic(exp.method, exp, ModelSpec(net, SHAPE, 10), profile_model(net, SHAPE))


def ctx(m: Dynamic, n: int) -> LocalContext:
    return LocalContext(0, 1, 0.05, 0, m.experiment.local, n)


def data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------------------------------------
# the gated model
# ------------------------------------------------------------------------------------------------


def test_keep_count() -> None:
    assert keep_count(0.5, 32) == 16
    assert keep_count(0.7, 64) == 45
    assert keep_count(0.01, 8) == 1
    assert keep_count(1.0, 5) == 5


def test_pairs_and_names_unchanged_with_gates_namespace() -> None:
    m = make()
    assert m.pairs == [("conv1", "bn1"), ("conv2", "bn2")]
    model = m.new_model()
    orig = list(m.spec.template.state_dict())
    keys = list(model.state_dict())
    assert keys[: len(orig)] == orig
    assert keys[len(orig) :] == ["gates.conv1.weight", "gates.conv1.bias", "gates.conv2.weight", "gates.conv2.bias"]
    assert torch.equal(model.state_dict()["gates.conv2.bias"], torch.ones(64))
    # the user's template is untouched (no gates attribute, no hooks)
    assert not hasattr(m.spec.template, "gates")
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.spec.template.modules())
    # ResNet: both convs of each block gated, 1x1 shortcuts not (unless asked)
    net = ResNet(SHAPE, 10, [4, 8], [1, 1], "r")
    pairs = find_gated_pairs(net, SHAPE)
    assert ("layers.1.0.conv2", "layers.1.0.bn2") in pairs
    assert not any("shortcut" in c for c, _ in pairs)
    assert any("shortcut" in c for c, _ in find_gated_pairs(net, SHAPE, gate_shortcut=True))


def test_per_sample_gating_exact_k_and_different_channels() -> None:
    m = make("method.density=0.5")
    model = m.new_model()
    assert isinstance(model, GatedModel)
    x, _ = data(16)
    _, keep = model.saliency("conv1", x)
    assert keep.shape == (16, 32)
    assert (keep.sum(1) == 16).all()  # exactly round(0.5 * 32) per sample
    assert len({tuple(r.tolist()) for r in keep}) > 1  # different samples, different channels
    # the gate really zeroes the suppressed channels of the BN output, per sample
    out = {}
    h = model.net.bn1.register_forward_hook(lambda mod, a, o: out.__setitem__("y", o))
    model.eval()
    model(x)
    h.remove()
    _, keep = model.saliency("conv1", x)
    zero = (out["y"] == 0).all(dim=(2, 3))
    assert torch.equal(zero | keep, torch.ones_like(keep))
    assert model.kept_fraction["conv1"] == pytest.approx(0.5)


def test_suppressed_channels_get_zero_gradient_for_that_sample() -> None:
    """One sample in eval mode (BN on running statistics: no coupling between samples): exactly
    the filters, BN affine pairs and predictor rows of its kept channels receive gradient."""
    m = make("method.density=0.5")
    model = m.new_model()
    assert isinstance(model, GatedModel)
    model.eval()
    x, y = data(1, seed=3)
    F.cross_entropy(model(x), y).backward()
    _, keep = model.saliency("conv2", F.max_pool2d(torch.relu(model.net.bn1(model.net.conv1(x))), 2))
    kept = keep[0]
    gw = model.net.conv2.weight.grad.flatten(1).abs().sum(1)
    assert (gw[~kept] == 0).all() and (gw[kept] > 0).sum() >= kept.sum() - 2
    assert (model.net.bn2.weight.grad[~kept] == 0).all() and (model.net.bn2.bias.grad[~kept] == 0).all()
    assert (model.gates["conv2"].weight.grad[~kept] == 0).all()
    assert (model.gates["conv2"].bias.grad[~kept] == 0).all()


def test_union_of_gradients_upload_and_unsent_filters_unchanged() -> None:
    """Local training without weight decay: with ``upload=used`` the sent masks are the union of
    kept channels over all samples; unsent filters/BN/predictor rows come back exactly as
    received."""
    m = make("method.density=0.25", "local.batch_size=8", "method.upload=used")
    model = m.new_model()
    down = Update(values={k: v.clone() for k, v in model.state_dict().items()})
    x, y = data(16, seed=5)
    state = m.receive(model, down, {})
    c = ctx(m, len(x))
    hooks = m.hooks(model, state, c)
    seen: dict[str, torch.Tensor] = {}
    assert isinstance(model, GatedModel)
    for conv, _ in m.pairs:  # independent record of every sample's kept set
        mod = dict(model.net.named_modules())[conv]
        mod.register_forward_pre_hook(
            lambda mod, a, conv=conv: seen.__setitem__(
                conv,
                seen.get(conv, torch.zeros(mod.out_channels, dtype=torch.bool)) | model.saliency(conv, a[0])[1].any(0),
            )
        )
    try:
        train_local(hooks, x, y, m.experiment.local, 0.05, torch_gen(0, "t"), m.profile)
        d = hooks.densities()
        assert d["conv1.weight"].forward == pytest.approx(0.25) and d["conv2.weight"].grad_weight == pytest.approx(0.25)
    finally:
        hooks.close()
    update, new_state = m.upload(model, down, state, c)
    assert not any(k.startswith("dynamic.") for k in new_state)
    for conv, bn in m.pairs:
        used = seen[conv]
        assert 0 < int(used.sum()) < len(used)
        assert torch.equal(update.sent[f"{conv}.weight"][:, 0, 0, 0], used)
        for name in (f"{bn}.weight", f"{bn}.bias", f"gates.{conv}.bias"):
            assert torch.equal(update.sent[name], used)
        assert torch.equal(update.sent[f"gates.{conv}.weight"][:, 0], used)
        w_new, w_old = model.state_dict()[f"{conv}.weight"], down.values[f"{conv}.weight"]
        assert torch.equal(w_new[~used], w_old[~used])  # never kept -> never moved
        assert not torch.equal(w_new[used], w_old[used])
    assert "fc1.weight" not in update.sent and "bn1.running_mean" not in update.sent  # dense


def test_uploaded_channels_oracle() -> None:
    """``upload=kept``: the round(density * C) channels kept for the most samples, ties to the
    lower index, never a channel kept for no sample; ``upload=used``: every channel kept once."""
    m = make("method.density=0.5")
    m.pairs = [("a", "a_bn"), ("b", "b_bn")]
    counts = {"a": torch.tensor([5, 0, 5, 3]), "b": torch.tensor([0, 0, 1, 0])}
    got = m._uploaded_channels(counts)
    assert got["a"].tolist() == [True, False, True, False]
    assert got["b"].tolist() == [False, False, True, False]
    used = make("method.density=0.5", "method.upload=used")
    used.pairs = m.pairs
    assert used._uploaded_channels(counts)["a"].tolist() == [True, False, True, True]


def test_kept_upload_sends_density_of_each_layer_and_zero_elsewhere() -> None:
    m = make("method.density=0.25", "local.batch_size=8")
    model = m.new_model()
    down = Update(values={k: v.clone() for k, v in model.state_dict().items()})
    x, y = data(16, seed=5)
    state = m.receive(model, down, {})
    c = ctx(m, len(x))
    hooks = m.hooks(model, state, c)
    try:
        train_local(hooks, x, y, m.experiment.local, 0.05, torch_gen(0, "t"), m.profile)
    finally:
        hooks.close()
    counts = {conv: state[f"dynamic.used.{conv}"] for conv, _ in m.pairs}
    update, _ = m.upload(model, down, state, c)
    for conv, bn in m.pairs:
        rows = update.sent[f"{conv}.weight"][:, 0, 0, 0]
        assert int(rows.sum()) == keep_count(0.25, len(rows))
        assert int(counts[conv][rows].min()) >= int(counts[conv][~rows].max())  # the most-kept channels
        assert (update.values[f"{conv}.weight"][~rows] == 0).all()
        assert torch.equal(update.sent[f"{bn}.weight"], rows)


def test_aggregate_per_coordinate_oracle() -> None:
    m = make()
    cur = {"w": torch.tensor([1.0, 1.0, 1.0])}
    a = Update(values={"w": torch.tensor([3.0, 0.0, 0.0])}, sent={"w": torch.tensor([True, False, False])})
    b = Update(values={"w": torch.tensor([6.0, 4.0, 0.0])}, sent={"w": torch.tensor([True, True, False])})
    new = m.aggregate(ServerState(0, cur), [Received(0, a, 10), Received(1, b, 30)])
    # coordinate 0: (10*3 + 30*6) / 40; 1: only b; 2: nobody -> kept
    assert torch.allclose(new.params["w"], torch.tensor([5.25, 4.0, 1.0]))
    assert new.round == 1


def test_init_state_adds_predictors_and_inference_flops() -> None:
    m = make("method.density=0.5")
    params = m.spec.build().state_dict()
    state = m.init_state(params)
    assert set(state.params) == set(params) | {f"gates.{c}.{p}" for c, _ in m.pairs for p in ("weight", "bias")}
    eff, dense = m.inference_flops_per_sample(state.params, data(64)[0])
    assert dense == m.profile.dense_forward()
    conv = sum(m.profile.layer(f"{c}.weight").macs for c, _ in m.pairs) * 2
    pred = 2 * (1 * 32 + 32 * 64)
    assert eff == pytest.approx(dense - conv * 0.5 + pred)
    assert eff / dense < 0.6


def test_threshold_variant() -> None:
    m = make("method.variant=threshold", "method.threshold=0.05")
    model = m.new_model()
    assert not isinstance(model, GatedModel) and set(model.state_dict()) == set(m.spec.template.state_dict())
    assert steps_per_epoch(33, 8) == 4 and steps_per_epoch(34, 8) == 5 and steps_per_epoch(5, 32) == 1
    hooks = m.hooks(model, {}, ctx(m, 16))
    assert isinstance(hooks, ThresholdHooks) and hooks.steps_per_epoch == 1
    hooks.after_step(0)
    for mod in (model.conv1, model.conv2):
        assert (mod.weight.abs() > 0.05).logical_or(mod.weight == 0).all()
    assert (model.conv2.weight == 0).any()
    assert (model.fc1.weight.abs() <= 0.05).any()  # only convs are thresholded
    update, _ = m.upload(model, Update(values=model.state_dict()), {}, ctx(m, 16))
    assert update.sent == {}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.density=0", "method.density"),
        ("method.sparsity=0.5", "method.sparsity"),
        ("method.variant=x", "method.variant"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=["method.name=dynamic", override])


def test_mlp_cannot_be_gated() -> None:
    with pytest.raises(ConfigError, match="method.variant"):
        make(model="mlp")
    make("method.variant=threshold", model="mlp")


# ------------------------------------------------------------------------------------------------
# end to end on digits
# ------------------------------------------------------------------------------------------------

MUST = ["federation.num_clients=20", "federation.clients_per_round=10", "data.alpha=0.5"]


def test_e2e_short_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Three rounds through the real server loop and codecs: gates in the global model, training
    FLOPs about half of dense at density 0.5, uploads smaller than dense FedAvg's."""
    dyn = run_experiment(
        load_config(overrides=[*MUST, "federation.rounds=3", "method.name=dynamic", "method.density=0.5"]),
        tmp_path / "d",
    )
    dense = run_experiment(load_config(overrides=[*MUST, "federation.rounds=3"]), tmp_path / "f")
    assert 0.5 < dyn["train_flops_total"] / dyn["train_flops_dense_total"] < 0.6
    assert dyn["uplink_bytes_total"] < dense["uplink_bytes_total"]
    assert dyn["final_accuracy"] > 0.15


def test_e2e_kept_upload_is_smaller_than_fedavg_and_than_the_union(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The communication claim, counted from the real encoded payloads: on a ResNet (convs carry
    most of the weights) at density 0.5, the kept-channel upload is well under FedAvg's, while
    the union of used channels is about FedAvg's size."""
    base = [*MUST, "federation.rounds=1", "federation.num_clients=10", "federation.clients_per_round=5"]
    base += ["model.name=resnet8"]
    dyn = ["method.name=dynamic", "method.density=0.5"]
    kept = run_experiment(load_config(overrides=[*base, *dyn]), tmp_path / "k")
    used = run_experiment(load_config(overrides=[*base, *dyn, "method.upload=used"]), tmp_path / "u")
    dense = run_experiment(load_config(overrides=base), tmp_path / "f")
    assert kept["uplink_bytes_total"] < 0.7 * dense["uplink_bytes_total"]
    assert kept["uplink_bytes_total"] < 0.7 * used["uplink_bytes_total"]


def test_e2e_threshold_zeroed_weights_cost_next_to_nothing_on_the_uplink(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Threshold variant: the upload is dense, and the default codec sends its zeroed conv
    weights as nonzeros only, so it is smaller than FedAvg's on the same federation."""
    base = [*MUST, "federation.rounds=1", "federation.num_clients=10", "federation.clients_per_round=5"]
    thr = ["method.name=dynamic", "method.variant=threshold", "method.threshold=0.05"]
    kept = run_experiment(load_config(overrides=[*base, *thr]), tmp_path / "k")
    dense = run_experiment(load_config(overrides=base), tmp_path / "d")
    assert kept["uplink_bytes_total"] < 0.9 * dense["uplink_bytes_total"]


@pytest.mark.slow
def test_e2e_density_half_close_to_dense_with_fewer_inference_flops(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The must-show setting: 30 rounds; dynamic at density 0.5 within 5 points of dense FedAvg,
    inference FLOPs per test sample at most 0.6 of dense."""
    from safetensors.torch import load_file

    from sparsefl.experiment.runner import build

    cfg = load_config(overrides=[*MUST, "federation.rounds=30", "method.name=dynamic", "method.density=0.5"])
    dyn = run_experiment(cfg, tmp_path / "d")
    dense = run_experiment(load_config(overrides=[*MUST, "federation.rounds=30"]), tmp_path / "f")
    assert dyn["final_accuracy"] >= dense["final_accuracy"] - 0.05
    b = build(cfg)
    assert isinstance(b.method, Dynamic)
    eff, full = b.method.inference_flops_per_sample(load_file(str(tmp_path / "d" / "model.safetensors")), b.data.x_test)
    assert eff / full <= 0.6
