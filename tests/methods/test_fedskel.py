"""FedSkel: skeleton selection, gradient masking, personalised download, per-filter aggregation,
tiers, config validation, and an end-to-end comparison with dense FedAvg on digits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsefl.accounting import profile_model, train_flops
from sparsefl.comm import Update
from sparsefl.config import LocalConfig, load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import build, run_experiment
from sparsefl.methods.fedskel import (
    SkeletonHooks,
    assign_tiers,
    channel_importance,
    rows_mask,
    select_skeleton,
    skeleton_layers,
)
from sparsefl.models.nets import CNN
from sparsefl.protocol.messages import LocalContext, Received, ServerState
from sparsefl.rng import torch_gen
from sparsefl.runtime.client import train_local, train_step
from sparsefl.runtime.sgd import SGD

TINY = ["federation.num_clients=6", "federation.clients_per_round=3", "federation.rounds=3", "data.min_samples=5"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return CNN((1, 8, 8), 10)


def test_selection_picks_top_l1_channels():
    # channel c of a hand-built output has |Y| summing to a known value; ties go to the lower index
    y = torch.zeros(2, 4, 3, 3)
    y[:, 0] = -1.0  # L1 = 18
    y[:, 1] = 0.1  # 1.8
    y[:, 2] = 2.0  # 36
    y[:, 3] = 1.0  # 18 (ties with 0)
    imp = channel_importance(y)
    assert torch.allclose(imp, torch.tensor([18.0, 1.8, 36.0, 18.0], dtype=torch.float64))
    assert select_skeleton(imp, 0.5).tolist() == [True, False, True, False]
    assert select_skeleton(imp, 0.25).tolist() == [False, False, True, False]
    assert select_skeleton(imp, 0.01).sum() == 1  # at least one channel
    # accumulation over steps: the hooks sum the importance of every SetSkel forward
    model = _model()
    layers = skeleton_layers(model, False, "train")
    h = SkeletonHooks(model, profile_model(model, (1, 8, 8)), layers, 0.25, None, setskel_steps=2)
    x1, x2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    h.forward(x1)
    h.forward(x2)
    with torch.no_grad():  # (no_grad: the hook does not count these reference passes)
        expect = channel_importance(model.conv1(x1)) + channel_importance(model.conv1(x2))
    assert torch.allclose(h.importance["conv1.weight"], expect)
    h.after_step(1)
    assert torch.equal(h.skeleton["conv1.weight"], select_skeleton(expect, 0.25))
    h.close()


def test_sampled_selection_follows_importance_and_the_seed():
    imp = torch.tensor([100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    a = select_skeleton(imp, 0.25, torch_gen(0, "a"))
    assert a.sum() == 2 and torch.equal(a, select_skeleton(imp, 0.25, torch_gen(0, "a")))  # seeded
    picks = torch.stack([select_skeleton(imp, 0.25, torch_gen(0, "s", i)) for i in range(200)]).double()
    # p(channel 0 first) = 100/107: it is (almost) always in; the rest share the other slot evenly
    assert picks[:, 0].mean() > 0.9
    rest = picks[:, 1:].mean(0)
    assert rest.min() > 0.05 and (rest.max() - rest.min()) < 0.15
    assert select_skeleton(torch.zeros(8, dtype=torch.float64), 0.25, torch_gen(1, "z")).sum() == 2
    # the method passes a generator per (seed, client, round) only with selection=sample
    ctx = LocalContext(3, 2, 0.1, 0, _method().experiment.local, 10)
    for over, sampled in (("method.selection=sample", True), ("method.selection=top", False)):
        h = _method(over).hooks(_model(), {}, ctx)
        assert (h.gen is not None) == sampled
        h.close()


@pytest.mark.parametrize("bn", ["train", "skeleton"])
def test_gradient_masking_and_frozen_filters(bn):
    model = _model()
    ref = _model()
    layers = skeleton_layers(model, False, bn)
    skel = {lay.name: torch.arange(model.get_parameter(lay.name).shape[0]) % 4 == 0 for lay in layers}
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    h = SkeletonHooks(
        model, profile_model(model, (1, 8, 8)), layers, 0.25, skel, setskel_steps=1, mask_bn_output=bn == "skeleton"
    )
    nn.functional.cross_entropy(h.forward(x), y).backward()
    nn.functional.cross_entropy(ref(x), y).backward()
    for lay in layers:
        g = model.get_parameter(lay.name).grad
        s = skel[lay.name]
        assert torch.count_nonzero(g[~s]) == 0  # non-skeleton filters: exactly zero gradient
        assert g[s].abs().sum() > 0
    # the last conv's skeleton weight grads equal the dense ones (its output grad is untouched on
    # skeleton channels); earlier layers differ by design: their input grads come from the skeleton only
    last = layers[-1].name
    assert torch.allclose(model.get_parameter(last).grad[skel[last]], ref.get_parameter(last).grad[skel[last]])
    bn_w = model.bn2.weight.grad
    if bn == "skeleton":
        assert torch.count_nonzero(bn_w[~skel["conv2.weight"]]) == 0
    else:
        assert torch.count_nonzero(bn_w[~skel["conv2.weight"]]) > 0
    h.close()
    # a full local round with momentum and weight decay leaves non-skeleton filters bit-identical
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = SkeletonHooks(
        model, profile_model(model, (1, 8, 8)), layers, 0.25, skel, setskel_steps=1, mask_bn_output=bn == "skeleton"
    )
    local = LocalConfig(epochs=2, batch_size=8, momentum=0.9, weight_decay=5e-3)
    stats = train_local(
        h, torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)), local, 0.1, torch_gen(0, "t"), h.profile
    )
    h.close()
    for lay in layers:
        s = skel[lay.name]
        for t in lay.frozen:
            assert torch.equal(model.state_dict()[t][~s], before[t][~s]), t
        assert not torch.equal(model.state_dict()[lay.name][s], before[lay.name][s])
    # FLOPs: forward dense; both backward products scale with the skeleton fraction (1/4 here)
    prof = h.profile
    expect = sum(
        2 * lay.macs * (1 + (0.25 if lay.kind == "conv" else 1) * (1 if lay.first else 2)) for lay in prof.layers
    )
    assert stats.flops.total == pytest.approx(expect * stats.samples)
    assert stats.flops.total_dense == train_flops(prof, stats.samples).total_dense
    assert not model.conv1._forward_hooks  # close() removed everything


def _method(*over: str):
    cfg = load_config(overrides=[*TINY, "method.name=fedskel", *over])
    return build(cfg).method


def test_personalised_download_and_upload():
    m = _method("method.bn=skeleton", "method.reselect_every=0")  # between re-selections
    model = m.new_model()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    own = {k: v + 1.0 if v.is_floating_point() else v for k, v in params.items()}
    skel = {lay.name: torch.arange(model.get_parameter(lay.name).shape[0]) < 3 for lay in m.layers}
    cstate = {f"skel/{k}": v for k, v in skel.items()}
    personal = {t: lay.name for lay in m.layers for t in lay.personal}  # conv weights (+ BN affine, bn=skeleton)
    assert set(personal) == {"conv1.weight", "conv2.weight", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    cstate.update({f"w/{k}": own[k] for k in personal})
    # the server knows the client's skeleton: it sends only skeleton rows of the conv weights
    state = ServerState(0, params, extra={f"skel/4/{k}": v for k, v in skel.items()})
    down = m.downlink(state, 4)
    assert down.sent["conv2.weight"].reshape(64, -1).any(1).tolist() == skel["conv2.weight"].tolist()
    assert "fc1.weight" not in down.sent  # dense small/linear tensors
    assert m.downlink(state, 5) is None  # unknown client: the broadcast (full model)
    new_state = m.receive(model, down, cstate)
    sd = model.state_dict()
    for k, lay_name in personal.items():
        s = skel[lay_name]
        assert torch.equal(sd[k][s], params[k][s])  # server's skeleton filters
        assert torch.equal(sd[k][~s], own[k][~s])  # its own other filters
    assert torch.equal(sd["fc1.weight"], params["fc1.weight"])
    ctx = LocalContext(4, 1, 0.1, 0, m.experiment.local, 10)
    up, st = m.upload(model, down, new_state, ctx)
    assert up.sent["conv1.weight"].reshape(32, -1).any(1).tolist() == skel["conv1.weight"].tolist()
    assert torch.equal(st["w/conv2.weight"], sd["conv2.weight"])


def test_reselection_downloads_the_full_model_and_reselects():
    m = _method("method.reselect_every=2")
    model = m.new_model()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    skel = {lay.name: torch.arange(model.get_parameter(lay.name).shape[0]) < 3 for lay in m.layers}
    extra = {f"skel/4/{k}": v for k, v in skel.items()}
    extra["skel_round/4"] = torch.tensor(1)
    # selected in round 1: round 2 sends skeleton rows, round 3 (2 rounds later) the full model
    assert not m._reselects(ServerState(1, params, extra=extra), 4)
    assert m.downlink(ServerState(1, params, extra=extra), 4) is not None
    assert m._reselects(ServerState(2, params, extra=extra), 4)
    assert m.downlink(ServerState(2, params, extra=extra), 4) is None  # the broadcast: every filter
    assert m._reselects(ServerState(2, params, extra={}), 5)  # unknown client
    assert not _method("method.reselect_every=0")._reselects(ServerState(9, params, extra=extra), 4)
    # the client takes every server value (not its own non-skeleton filters) and forgets its skeleton
    own = {k: v + 1.0 if v.is_floating_point() else v for k, v in params.items()}
    cstate = {f"skel/{k}": v for k, v in skel.items()}
    cstate.update({f"w/{t}": own[t] for lay in m.layers for t in lay.personal})
    cstate["skel_round"] = torch.tensor(1)
    new_state = m.receive(model, m.broadcast(ServerState(2, params)), cstate)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert m._skeleton(new_state) is None and "skel_round" not in new_state
    ctx = LocalContext(4, 3, 0.1, 0, m.experiment.local, 10)
    hooks = m.hooks(model, new_state, ctx)
    assert hooks.skeleton is None  # SetSkel runs again this round
    hooks.close()
    assert m._skeleton(new_state) is not None and int(new_state["skel_round"]) == 3
    # the server records the round a due client selected in
    vals = {k: v.clone() for k, v in params.items()}
    sent = {lay.name: rows_mask(skel[lay.name], params[lay.name].shape) for lay in m.layers}
    out = m.aggregate(ServerState(2, params, extra=extra), [Received(4, Update(vals, sent), 10)])
    assert int(out.extra["skel_round/4"]) == 3
    out = m.aggregate(ServerState(1, params, extra=extra), [Received(4, Update(vals, sent), 10)])
    assert int(out.extra["skel_round/4"]) == 1  # not due: unchanged


def test_reselection_round_downlink_is_counted_in_full(tmp_path):
    """A reselecting client is sent the full model: with re-selection at every participation the
    downlink bytes equal dense FedAvg's exactly; without re-selection they are smaller."""
    runs = {}
    for name, over in (
        ("fedavg", ["method.name=fedavg"]),
        ("every", ["method.name=fedskel", "method.reselect_every=1"]),
        ("never", ["method.name=fedskel", "method.reselect_every=0"]),
    ):
        runs[name] = run_experiment(load_config(overrides=[*TINY, "federation.rounds=4", *over]), tmp_path / name)
    assert runs["every"]["downlink_bytes_total"] == runs["fedavg"]["downlink_bytes_total"]
    assert runs["never"]["downlink_bytes_total"] < runs["fedavg"]["downlink_bytes_total"]


def test_per_filter_aggregation_oracle():
    m = _method()
    params = {k: torch.zeros_like(v) for k, v in m.new_model().state_dict().items()}
    state = ServerState(0, params)

    def upd(value: float, rows: list[int]) -> Update:
        vals = {k: torch.full_like(v, value) for k, v in params.items()}
        sent = {}
        for name in ("conv1.weight", "conv2.weight"):
            ch = torch.zeros(vals[name].shape[0], dtype=torch.bool)
            ch[rows] = True
            sent[name] = ch.view(-1, 1, 1, 1).expand_as(vals[name]).clone()
        return Update(vals, sent)

    new = m.aggregate(state, [Received(1, upd(1.0, [0, 1]), 10), Received(2, upd(4.0, [1, 2]), 30)])
    w = new.params["conv2.weight"][:, 0, 0, 0]
    assert w[0] == 1.0  # only client 1 sent filter 0
    assert w[1] == pytest.approx((1 * 10 + 4 * 30) / 40)  # both: sample-weighted
    assert w[2] == 4.0
    assert w[3] == 0.0  # nobody: the server's value
    assert new.params["fc1.weight"][0, 0] == pytest.approx(3.25)  # dense tensors: weighted mean
    assert new.extra["skel/2/conv1.weight"][:3].tolist() == [False, True, True]


def test_tiers_deterministic_and_balanced():
    a = assign_tiers(0, 20, (1.0, 0.5, 0.25, 0.1))
    assert a == assign_tiers(0, 20, (1.0, 0.5, 0.25, 0.1))
    assert a != assign_tiers(1, 20, (1.0, 0.5, 0.25, 0.1))
    assert sorted(a.count(t) for t in (1.0, 0.5, 0.25, 0.1)) == [5, 5, 5, 5]
    m = _method("method.tiers=[1.0,0.5]")
    assert [m.ratio(c) for c in range(6)] == assign_tiers(0, 6, (1.0, 0.5))


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.skeleton_ratio=0", "method.skeleton_ratio"),
        ("method.skeleton_ratio=1.5", "method.skeleton_ratio"),
        ("method.tiers=[0.5,0]", "method.tiers"),
        ("method.setskel_steps=0", "method.setskel_steps"),
        ("method.reselect_every=-1", "method.reselect_every"),
        ("method.aggregation='mean'", "method.aggregation"),
        ("method.selection='random'", "method.selection"),
        ("method.bn='none'", "method.bn"),
        ("method.sparsity=0.5", "method.sparsity"),
        ("method.skeleton_rate=0.5", "method.skeleton_rate"),
    ],
)
def test_config_validation(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method.name=fedskel", override])
    assert e.value.key == key


def test_mean_full_and_reselect_run(tmp_path):
    s = run_experiment(
        load_config(
            overrides=[
                *TINY,
                "method.name=fedskel",
                "method.aggregation=mean_full",
                "method.reselect_every=1",
                "method.setskel_steps=1",
                "data.val_fraction=0.2",
            ]
        ),
        tmp_path / "x",
    )
    rows = [json.loads(x) for x in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert s["final_accuracy"] > 0.1 and all(r["personal_accuracy"] is not None for r in rows)


DIGITS = ["federation.num_clients=20", "federation.clients_per_round=10", "federation.rounds=30", "data.alpha=0.5"]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    out = {}
    for name, over in (
        ("fedavg", ["method.name=fedavg"]),
        ("fedskel", ["method.name=fedskel"]),
        ("fedskel_fixed", ["method.name=fedskel", "method.reselect_every=0"]),
        ("fedskel_linear", ["method.name=fedskel", "method.skeleton_linear=true"]),
    ):
        out[name] = run_experiment(load_config(overrides=[*DIGITS, *over]), d / name)
        out[name + "_rows"] = [json.loads(x) for x in (d / name / "metrics.jsonl").read_text().splitlines()]
    return out


def test_digits_accuracy_close_to_fedavg(digits_runs):
    fa, fs = digits_runs["fedavg"]["final_accuracy"], digits_runs["fedskel"]["final_accuracy"]
    assert fs >= fa - 0.05, (fs, fa)


def test_digits_backward_flops_follow_skeleton(digits_runs):
    # without re-selection, a round where every client already has its skeleton is skeleton-only
    m = _method()
    prof = m.profile
    frac = {lay.name: 0.25 for lay in m.layers}  # 32 -> 8 and 64 -> 16 channels exactly
    fwd = prof.dense_forward()
    bwd = sum(2 * lay.macs * frac.get(lay.name, 1.0) * (1 if lay.first else 2) for lay in prof.layers)
    expect = (fwd + bwd) / prof.dense_train()
    seen: set[int] = set()
    checked = 0
    for r in digits_runs["fedskel_fixed_rows"]:
        ids = {c["id"] for c in r["clients"]}
        if ids <= seen:  # no client selects its skeleton this round: every step is skeleton-only
            assert r["train_flops"] / r["train_flops_dense"] == pytest.approx(expect, rel=1e-9)
            checked += 1
        seen |= ids
    assert checked >= 5
    s = digits_runs["fedskel_fixed"]
    assert expect < s["train_flops_total"] / s["train_flops_dense_total"] < 1
    # re-selecting each round: the SetSkel steps (5) cover most of a digits round (1-5 steps)
    s = digits_runs["fedskel"]
    assert expect < s["train_flops_total"] / s["train_flops_dense_total"] <= 1


def test_digits_uplink_at_most_0_3_of_fedavg_with_linear_skeletons(digits_runs):
    """The issue's bound (skeleton ratio 0.25: uplink <= 0.3 of dense FedAvg, accuracy within 5
    points). FedSkel itself skeletonises convolutions only, and on the digits CNN fc1 holds 61% of
    the parameters, so the paper-faithful default cannot go below ~0.74 (next test); with
    ``skeleton_linear`` (our extension: hidden linear layers get skeleton rows too) it does.
    Measured: accuracy 0.975 vs 0.983 at the defaults (0.939 without re-selection)."""
    ratio = digits_runs["fedskel_linear"]["uplink_bytes_total"] / digits_runs["fedavg"]["uplink_bytes_total"]
    assert ratio <= 0.3, ratio
    assert digits_runs["fedskel_linear"]["final_accuracy"] >= digits_runs["fedavg"]["final_accuracy"] - 0.05


def test_uplink_ratio_matches_design(digits_runs):
    # values sent: skeleton rows of conv weights + everything else; the codec adds a little for the masks
    m = _method()
    sd = m.new_model().state_dict()
    total = sum(v.numel() for v in sd.values())
    conv = sum(sd[t].numel() for lay in m.layers for t in lay.personal)
    sent = total - conv + 0.25 * conv
    ratio = digits_runs["fedskel"]["uplink_bytes_total"] / digits_runs["fedavg"]["uplink_bytes_total"]
    assert sent / total <= ratio <= sent / total + 0.03, (ratio, sent / total)


def test_skeleton_linear_uplink_matches_design(digits_runs):
    # with the hidden linear layer skeletonised too: the values are 0.28 of the model; row-coded
    # masks cost a few bytes per tensor
    ratio = digits_runs["fedskel_linear"]["uplink_bytes_total"] / digits_runs["fedavg"]["uplink_bytes_total"]
    m = _method("method.skeleton_linear=true")
    sd = m.new_model().state_dict()
    total = sum(v.numel() for v in sd.values())
    rows_t = sum(sd[t].numel() for lay in m.layers for t in lay.personal)
    sent = (total - rows_t + 0.25 * rows_t) / total
    assert sent <= ratio <= sent + 0.03, (ratio, sent)


@pytest.mark.slow
def test_resnet20_digits_within_5_points_of_fedavg(tmp_path):
    """Skeleton ratio 0.25 on resnet20 at the defaults (re-selection every round, sampled
    skeletons): within 5 points of dense FedAvg on the same model. Measured 0.969 vs 0.978;
    without re-selection it collapsed (0.449)."""
    over = [*DIGITS, "model.name=resnet20"]
    fa = run_experiment(load_config(overrides=[*over, "method.name=fedavg"]), tmp_path / "fedavg")
    fs = run_experiment(load_config(overrides=[*over, "method.name=fedskel"]), tmp_path / "fedskel")
    assert fs["final_accuracy"] >= fa["final_accuracy"] - 0.05, (fs["final_accuracy"], fa["final_accuracy"])


def test_clip_norm_clips_the_skeleton_gradients() -> None:
    """``local.clip_norm`` covers the row-compact gradients the skeleton layers train with."""
    over = ["federation.num_clients=6", "federation.clients_per_round=3", "data.min_samples=5", "method.name=fedskel"]
    m = build(load_config(overrides=[*over, "local.momentum=0", "local.weight_decay=0"])).method
    model = m.new_model()
    state = {f"skel/{lay.name}": torch.arange(model.get_parameter(lay.name).shape[0]) < 3 for lay in m.layers}
    state["skel_round"] = torch.tensor(1)
    hooks = m.hooks(model, state, LocalContext(4, 2, 1.0, 0, m.experiment.local, 32))
    assert hooks is not None
    x, y = torch.randn(32, 1, 8, 8, generator=torch_gen(0, "x")), torch.arange(32) % 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        train_step(hooks, SGD(hooks.parameters(), lr=1.0, momentum=0, weight_decay=0), x, y, 0, clip_norm=1e-3)
    finally:
        hooks.close()
    moved = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in model.named_parameters()) ** 0.5
    assert 0 < moved <= 1e-3 * 1.001
