"""ZeroFL (method.name=zerofl): top-k exactness, threshold caching, SWAT through the layers' autograd,
aggregation oracles, config validation, and end-to-end runs on digits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefl  # noqa: F401  (fills the registries)
from sparsefl.accounting import profile_model
from sparsefl.comm import Update
from sparsefl.config import load_config
from sparsefl.errors import ConfigError
from sparsefl.experiment.runner import run_experiment
from sparsefl.kernels.topk import shrink
from sparsefl.methods.zerofl import (
    CachedTopK,
    ZeroFL,
    ZeroFLConfig,
    ZeroFLHooks,
    keep_count,
    swat,
    topk_mask,
)
from sparsefl.models import ModelSpec
from sparsefl.protocol.messages import LocalContext, Received, ServerState
from sparsefl.runtime.client import train_step
from sparsefl.runtime.sgd import SGD

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """conv (input) -> conv -> linear -> linear (classifier); scope = conv2, fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make_method(**cfg: object) -> ZeroFL:
    torch.manual_seed(0)
    model = Tiny()
    exp = load_config(overrides=["method.name=zerofl", *(f"method.{k}={v}" for k, v in cfg.items())])
    assert isinstance(exp.method, ZeroFLConfig)
    return ZeroFL(exp.method, exp, ModelSpec(model, (1, 4, 4), 3), profile_model(model, (1, 4, 4)))


def upd(values: dict[str, list[float]], sent: dict[str, list[bool]] | None = None) -> Update:
    return Update(
        values={k: torch.tensor(v) for k, v in values.items()},
        sent={k: torch.tensor(v) for k, v in (sent or {}).items()},
    )


class Fake(ZeroFL):
    """ZeroFL whose scope is one named tensor, for aggregation oracles on tiny tensors."""

    def __init__(self, **cfg: object) -> None:
        exp = load_config(overrides=["method.name=zerofl", *(f"method.{k}={v}" for k, v in cfg.items())])
        self.config = exp.method  # type: ignore[assignment]
        self.scope = ["w"]


# ------------------------------------------------------------------------------------------------
# top-k and threshold caching
# ------------------------------------------------------------------------------------------------


def test_topk_exact_count_and_deterministic_ties() -> None:
    torch.manual_seed(1)
    for n, d in [(1000, 0.1), (37, 0.2), (5, 0.01), (10, 0.999)]:
        v = torch.randn(n)
        m, tau = topk_mask(v, d)
        assert int(m.sum()) == keep_count(n, d)
        assert bool((v.abs()[m] >= tau).all()) and bool((v.abs()[~m] <= tau).all())
    # all ties: the lowest flat indices win, in any shape
    m, tau = topk_mask(torch.ones(2, 5), 0.3)
    assert m.flatten().tolist() == [True, True, True] + [False] * 7 and tau == 1.0
    m, _ = topk_mask(torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 0.5]), 0.5)
    assert m.tolist() == [False, True, True, True, False, False]  # |3| (idx 1, 3) then tie |2|: idx 2 < 4


def _kept(c: CachedTopK, v: torch.Tensor, step: int) -> list[bool]:
    """Which entries ``c`` keeps at ``step`` (the test tensors have no zeros where it matters)."""
    return (c.sparsify(v, step)[0] != 0).tolist()


def test_threshold_cache_reuses_tau_between_refreshes_and_refreshes_in_warmup() -> None:
    c = CachedTopK(density=0.25, period=3, warmup_steps=0)
    w = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.2, 0.3])
    assert _kept(c, w, 0) == [True, True] + [False] * 6 and c.tau == 3.0
    w2 = w.clone()
    w2[3] = 3.5  # crosses the cached threshold: kept by |v| >= tau right away, as SWAT does
    w2[0] = 2.9  # drops below it: removed
    assert _kept(c, w2, 1) == [False, True, False, True, False, False, False, False]
    assert c.refreshed_at == 0 and c.tau == 3.0
    w3 = w2.clone()
    w3[5] = 100.0
    w3[1] = 1.0  # now only 2 entries >= 3.0 but the set changes only on the threshold rule
    assert _kept(c, w3, 2) == [False, False, False, True, False, True, False, False]
    # step 3 is a refresh: exact top-2 of w3 and a new threshold
    m3 = _kept(c, w3, 3)
    assert c.refreshed_at == 3 and sum(m3) == 2 and c.tau == 3.5
    # a raised threshold set at refresh keeps a weight that later climbs to 3.4 out until the next refresh
    w4 = w3.clone()
    w4[2] = 3.4
    assert not _kept(c, w4, 4)[2] and c.refreshed_at == 3
    assert _kept(c, w4 * torch.tensor([0, 0, 1, 0, 0, 1, 0, 0.0]), 6)[2]  # refresh at 6: in top-2
    # warm-up: exact on every step before warmup_steps
    cw = CachedTopK(density=0.25, period=10, warmup_steps=4)
    for s in range(4):
        cw.sparsify(torch.randn(8), s)
        assert cw.refreshed_at == s
    cw.sparsify(torch.randn(8), 4)
    assert cw.refreshed_at == 3


# ------------------------------------------------------------------------------------------------
# the SWAT autograd functions, against autograd through explicitly masked tensors
# ------------------------------------------------------------------------------------------------


def _masks(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return topk_mask(w, 0.3)[0].float(), topk_mask(x, 0.4)[0].float()


def _layer(kind: str, w: torch.Tensor, b: torch.Tensor | None, **geo: object) -> nn.Module:
    """A float64 layer holding ``w`` and ``b``."""
    if kind == "linear":
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        conv = {3: nn.Conv1d, 4: nn.Conv2d}[w.dim()]
        groups = int(geo.get("groups", 1))  # type: ignore[call-overload]
        layer = conv(w.shape[1] * groups, w.shape[0], w.shape[2:], bias=b is not None, **geo)  # type: ignore[arg-type]
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_swat_forward_and_grads(kind: str) -> None:
    torch.manual_seed(2)
    if kind == "conv":
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
        geo = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 1), groups=1)

        def ref(xx: torch.Tensor, ww: torch.Tensor, bb: torch.Tensor) -> torch.Tensor:
            return F.conv2d(xx, ww, bb, **geo)  # type: ignore[arg-type]

    else:
        x = torch.randn(2, 3, 7, dtype=torch.float64)  # a linear layer saves a 2-D view of it
        w = torch.randn(5, 7, dtype=torch.float64)
        geo = {}
        ref = F.linear  # type: ignore[assignment]
    b = torch.randn(w.shape[0], dtype=torch.float64)
    layer = _layer(kind, w, b, **geo)
    wm, xm = _masks(w, x)
    xs, ws = x.clone().requires_grad_(), (w * wm).requires_grad_()  # the sparse weights: a leaf
    y = swat(layer, xs, ws, x * xm)
    gy = torch.randn_like(y)
    y.backward(gy)
    # forward = layer with top-k weights; dL/dx = grad through the masked weights
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    yr = ref(xr, wr * wm.double(), br)
    torch.testing.assert_close(y, yr)
    yr.backward(gy)
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(layer.bias.grad, br.grad)  # the bias: its own dense gradient
    assert layer.weight.grad is None  # the weight gradient arrives at the leaf
    # dL/dW = the weight gradient computed with the top-k activations, dense over W
    xa, wa = (x * xm.double()).requires_grad_(), w.clone().requires_grad_()
    ref(xa, wa, b).backward(gy)
    torch.testing.assert_close(ws.grad, wa.grad)
    assert bool((ws.grad[wm == 0] != 0).any())  # positions outside the top-k get gradient


def test_swat_takes_a_non_contiguous_linear_input_and_refuses_a_copied_one(monkeypatch) -> None:
    """A linear layer's non-contiguous 3-D input is made contiguous first (the product would
    save a copy of it); a layer that still saves a copy is refused, not trained densely."""
    torch.manual_seed(5)
    x = torch.randn(7, 2, 3, dtype=torch.float64).transpose(0, 1)  # (2, 7, 3), not contiguous
    w = torch.randn(4, 3, dtype=torch.float64)
    wm, xm = _masks(w, x)
    layer = _layer("linear", w, None)
    xs, ws = x.clone().requires_grad_(), (w * wm).requires_grad_()
    assert not xs.is_contiguous()
    y = swat(layer, xs, ws, x * xm)
    y.sum().backward()
    xr, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xr, w * wm).sum().backward()
    F.linear(x * xm, wa).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(ws.grad, wa.grad)
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: real_linear(x.clone(), w, b))
    with pytest.raises(RuntimeError, match="did not save its input"):
        swat(layer, x, ws, 0.1)
    with torch.no_grad():  # nothing saved, nothing to refuse
        swat(layer, x, ws, 0.1)


def test_conv_grouped_and_hooks_restore_and_dense_master_update() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    w = torch.randn(6, 2, 3, dtype=torch.float64)
    wm, xm = _masks(w, x)
    ws = (w * wm).requires_grad_()
    y = swat(_layer("conv", w, None, padding=1, groups=2), x, ws, x * xm)
    torch.testing.assert_close(y, F.conv1d(x, w * wm.double(), None, 1, 1, 1, 2))
    y.sum().backward()
    wa = w.clone().requires_grad_()
    F.conv1d(x * xm.double(), wa, None, 1, 1, 1, 2).sum().backward()
    torch.testing.assert_close(ws.grad, wa.grad)

    # the hooks: installed on the instance only, restored by close(); an SGD step moves a weight
    # outside the top-k (dense master update)
    m = make_method(sparsity=0.8)
    model = m.new_model()
    ctx = LocalContext(0, 1, 0.1, 0, m.experiment.local, 8)
    hooks = m.hooks(model, {}, ctx)
    assert isinstance(hooks, ZeroFLHooks) and set(hooks.scope) == {"conv2.weight", "fc1.weight"}
    assert "forward" in model.fc1.__dict__ and "forward" not in model.conv1.__dict__
    before = model.fc1.weight.detach().clone()
    params = dict(model.named_parameters())
    train_step(hooks, SGD(hooks.parameters(), lr=0.1), torch.randn(8, 1, 4, 4), torch.arange(8) % 3, 0)
    # every trained tensor got its gradient, the sparsified weights' moved from this step's leaves
    assert all(p.grad is not None for p in params.values())
    assert all(ws.grad is None for _, ws, _, _ in hooks._w_sparse.values())
    d = hooks.densities()
    assert set(d) == {"conv2.weight", "fc1.weight"}
    assert d["fc1.weight"].forward == pytest.approx(keep_count(before.numel(), 0.2) / before.numel())
    assert d["fc1.weight"].grad_input == d["fc1.weight"].forward
    assert d["fc1.weight"].grad_weight == pytest.approx(keep_count(8 * 96, 0.2) / (8 * 96))  # step 0: exact top-k
    out_mask = ~topk_mask(before, 0.2)[0]
    assert bool((model.fc1.weight.detach() != before)[out_mask].any())
    hooks.close()
    assert all("forward" not in mod.__dict__ for mod in model.modules())
    assert type(model).forward is Tiny.forward


def test_eval_and_personal_params_are_topk_and_downlink_dense() -> None:
    m = make_method(sparsity=0.75)
    params = m.spec.build().state_dict()
    ev = m.eval_params(ServerState(0, params))
    for n in ("conv2.weight", "fc1.weight"):
        assert int((ev[n] != 0).sum()) == keep_count(params[n].numel(), 0.25)
    for n in ("conv1.weight", "fc2.weight", "fc1.bias"):
        torch.testing.assert_close(ev[n], params[n])
    assert m.downlink(ServerState(0, params), 0) is None
    assert m.broadcast(ServerState(0, params)).values is params
    pp = m.personal_params(m.spec.build(), {})
    assert int((pp["fc1.weight"] != 0).sum()) == keep_count(params["fc1.weight"].numel(), 0.25)


# ------------------------------------------------------------------------------------------------
# uploads and aggregation oracles
# ------------------------------------------------------------------------------------------------


def test_upload_policies_select_the_right_positions() -> None:
    m = make_method(sparsity=0.9, mask_ratio=0.1)  # keep 20% per sparsified layer
    model = m.spec.build()
    down = Update(values={k: v.clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        model.fc1.weight.add_(torch.linspace(-1, 1, model.fc1.weight.numel()).view_as(model.fc1.weight))
    ctx = LocalContext(0, 1, 0.1, 0, m.experiment.local, 8)
    w, w0 = model.fc1.weight.detach(), down.values["fc1.weight"]
    k = keep_count(w.numel(), 0.2)
    cases = {
        "topk_weights": (w, topk_mask(w, 0.2)[0]),
        "diff_topk_weights": (w - w0, topk_mask(w, 0.2)[0]),
        "topk_diff": (w - w0, topk_mask(w - w0, 0.2)[0]),
    }
    for policy, (vals, mask) in cases.items():
        u, _ = make_method(sparsity=0.9, mask_ratio=0.1, upload=f'"{policy}"').upload(model, down, {}, ctx)
        assert set(u.sent) == {"conv2.weight", "fc1.weight"}, policy
        assert torch.equal(u.sent["fc1.weight"], mask) and int(mask.sum()) == k
        torch.testing.assert_close(u.values["fc1.weight"], vals * mask)
        torch.testing.assert_close(u.values["conv1.weight"], model.conv1.weight.detach())  # dense, plain
    u, _ = make_method(sparsity=0.9, upload='"dense"').upload(model, down, {}, ctx)
    assert u.sent == {} and set(u.values) == set(down.values)
    m0 = make_method(sparsity=0.9, mask_ratio=0.0)
    u, _ = m0.upload(model, down, {}, ctx)
    assert int(u.sent["fc1.weight"].sum()) == keep_count(w.numel(), 0.1)  # exactly SWAT's active set


def test_aggregate_oracles() -> None:
    cur = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0]), "nbt": torch.tensor(4)}
    state = ServerState(0, cur)
    a = upd({"w": [5.0, 0.0, 7.0, 99.0], "b": [1.0]}, {"w": [True, False, True, False]})
    b = upd({"w": [0.0, 6.0, 8.0, 0.0], "b": [4.0]}, {"w": [False, True, True, False]})
    a.values["nbt"], b.values["nbt"] = torch.tensor(10), torch.tensor(20)
    rec = [Received(0, a, 1), Received(1, b, 3)]

    def run(**cfg: object) -> dict[str, torch.Tensor]:
        return Fake(**cfg).aggregate(state, rec).params

    # paper, topk_weights: unsent = 0 in the weighted mean (99 is ignored: it was not sent)
    p = run(upload="topk_weights")
    torch.testing.assert_close(p["w"], torch.tensor([5 / 4, 18 / 4, (7 + 24) / 4, 0.0]))
    torch.testing.assert_close(p["b"], torch.tensor([(1 + 12) / 4]))
    assert p["nbt"].item() == (10 + 60) // 4 and p["nbt"].dtype == torch.int64
    # paper, both diff policies: w + sum_k n_k/n d_k, dense tensors averaged as values
    for pol in ("diff_topk_weights", "topk_diff"):
        p = run(upload=pol)
        torch.testing.assert_close(p["w"], torch.tensor([1 + 5 / 4, 2 + 18 / 4, 3 + 31 / 4, 4.0]))
        torch.testing.assert_close(p["b"], torch.tensor([13 / 4]))
    # per_coordinate (not the paper's rule): over senders only; nobody sent -> server value
    p = run(upload="topk_weights", aggregation="per_coordinate")
    torch.testing.assert_close(p["w"], torch.tensor([5.0, 6.0, 31 / 4, 4.0]))
    p = run(upload="topk_diff", aggregation="per_coordinate")
    torch.testing.assert_close(p["w"], torch.tensor([6.0, 8.0, 3 + 31 / 4, 4.0]))
    # dense = FedAvg
    d1, d2 = upd({"w": [1.0, 1, 1, 1], "b": [0.0]}), upd({"w": [3.0, 3, 3, 3], "b": [4.0]})
    d1.values["nbt"] = d2.values["nbt"] = torch.tensor(4)
    p = Fake(upload="dense").aggregate(state, [Received(0, d1, 1), Received(1, d2, 1)]).params
    torch.testing.assert_close(p["w"], torch.full((4,), 2.0))


# ------------------------------------------------------------------------------------------------
# config validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.upload=topk", "method.upload"),
        ("method.aggregation=mean", "method.aggregation"),
        ("method.act_sparsity=1.0", "method.act_sparsity"),
        ("method.act_sparsity=-0.1", "method.act_sparsity"),
        ("method.mask_ratio=1.5", "method.mask_ratio"),
        ("method.topk_period=0", "method.topk_period"),
        ("method.sparsity=0", "method.sparsity"),
    ],
)
def test_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["method.name=zerofl", override])
    assert key in str(e.value)


def test_config_defaults() -> None:
    c = load_config(overrides=["method.name=zerofl", "method.sparsity=0.95", "method.mask_ratio=0.2"]).method
    assert isinstance(c, ZeroFLConfig)
    assert c.act_density == pytest.approx(0.05) and c.upload_density == pytest.approx(0.25)
    assert c.upload == "topk_weights" and c.aggregation == "paper" and c.topk_period == 10
    c2 = load_config(overrides=["method.name=zerofl", "method.mask_ratio=1.0", "method.act_sparsity=0.5"]).method
    assert c2.upload_density == 1.0 and c2.act_density == 0.5  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------
# end to end on digits
# ------------------------------------------------------------------------------------------------

MUST = ["federation.num_clients=20", "federation.clients_per_round=10", "data.alpha=0.5"]
ZEROFL_R0 = [*MUST, "method.name=zerofl", "method.sparsity=0.9", "method.upload=topk_weights", "method.mask_ratio=0.0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The "must show" setting, shortened: 20 rounds for dense FedAvg and ZeroFL 90% (the
    30-round numbers are in the report), 3 rounds for the uplink comparisons (bytes per round
    do not depend on the round count, so they are compared per round)."""
    tmp = tmp_path_factory.mktemp("zerofl")
    cfgs = {
        "dense": [*MUST, "federation.rounds=20"],
        "zerofl": [*MUST, "federation.rounds=20", "method.name=zerofl", "method.sparsity=0.9"],
        "r0": [*ZEROFL_R0, "federation.rounds=3"],
        "r0_classifier": [*ZEROFL_R0, "federation.rounds=3", "method.sparsify_classifier=true"],
    }
    return {k: run_experiment(load_config(overrides=v), tmp / k) for k, v in cfgs.items()}


def _per_round_uplink(s: dict) -> float:
    return s["uplink_bytes_total"] / s["rounds"]


def test_e2e_accuracy_close_to_dense(runs: dict[str, dict]) -> None:
    assert runs["zerofl"]["final_accuracy"] >= runs["dense"]["final_accuracy"] - 0.05


def test_e2e_training_flops_at_most_a_fifth(runs: dict[str, dict]) -> None:
    s = runs["zerofl"]
    assert s["train_flops_total"] / s["train_flops_dense_total"] <= 0.2
    assert runs["dense"]["train_flops_total"] == runs["dense"]["train_flops_dense_total"]


def test_e2e_uplink_bytes_vs_dense(runs: dict[str, dict]) -> None:
    """Default cnn, 90% sparsity, topk_weights, r_mask 0. The sparsified layers cost about 0.115
    of dense with the real codecs (f32 values + entropy-coded positions); the tensors the paper
    keeps dense (input layer, classifier, BatchNorm, biases: ~4% of this small CNN's parameters)
    bring it to ~0.152 of dense FedAvg; sparsifying the classifier too brings it under 0.15."""
    dense = _per_round_uplink(runs["dense"])
    assert _per_round_uplink(runs["r0"]) / dense <= 0.16
    assert _per_round_uplink(runs["r0_classifier"]) / dense <= 0.15


def test_e2e_uplink_at_most_015_of_dense_on_resnet8(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The issue's bound on resnet8 (the other model it names), with the paper's dense input layer
    and classifier: its 3x3 convolutions hold nearly all parameters (measured 0.145)."""
    base = [*MUST, "model.name=resnet8", "federation.rounds=2"]
    dense = run_experiment(load_config(overrides=base), tmp_path / "d")
    zfl = run_experiment(
        load_config(overrides=[*base, "method.name=zerofl", "method.sparsity=0.9", "method.mask_ratio=0.0"]),
        tmp_path / "z",
    )
    assert zfl["uplink_bytes_total"] / dense["uplink_bytes_total"] <= 0.15


@pytest.mark.slow
def test_mask_ratio_zero_is_worse_on_skewed_digits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The paper's main finding (r_mask 0 clearly worse than 0.1 and 0.2 at 90%), on digits with
    alpha 0.1 and 15 rounds (the report gives the measured numbers)."""
    base = [
        "federation.num_clients=20", "federation.clients_per_round=10", "data.alpha=0.1",
        "federation.rounds=15", "method.name=zerofl", "method.sparsity=0.9",
    ]  # fmt: skip
    acc = {
        r: run_experiment(load_config(overrides=[*base, f"method.mask_ratio={r}"]), tmp_path / str(r))["final_accuracy"]
        for r in (0.0, 0.1, 0.2)
    }
    assert acc[0.0] < min(acc[0.1], acc[0.2]), acc


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_deferred_input_threshold_gives_the_same_grads_and_keeps_x_for_backward(kind: str) -> None:
    """A threshold in place of the sparse input (CachedTopK.deferred): the input is shrunk in
    the backward, with exactly the numbers of the explicit sparse input."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 6, 6) if kind == "conv" else torch.randn(4, 9)
    w = torch.randn(5, 3, 3, 3) if kind == "conv" else torch.randn(5, 9)
    tau = float(x.abs().flatten().kthvalue(int(0.7 * x.numel())).values)
    ws = shrink(w, float(w.abs().flatten().kthvalue(int(0.6 * w.numel())).values))
    layer = nn.Conv2d(3, 5, 3, padding=1, bias=False) if kind == "conv" else nn.Linear(9, 5, bias=False)
    for bf16 in (False, True):  # under autocast too, the fp32 input is shrunk in fp32, then cast
        grads = []
        for xsp in (shrink(x, tau), tau):
            xr, wr = x.clone().requires_grad_(), ws.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = swat(layer, xr, wr, xsp)
            (y.float() * torch.arange(y.numel()).reshape(y.shape).float().sin()).sum().backward()
            grads.append((y.detach(), xr.grad, wr.grad))
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    # the cache's deferred answer: the threshold, and the density sparsify would report
    c1, c2 = CachedTopK(0.3, 10, 0), CachedTopK(0.3, 10, 0)
    c1.sparsify(x, 0), c2.deferred(x, 0)
    d1, d2 = c1.sparsify(x * 1.1, 1), c2.deferred(x * 1.1, 1)
    assert d2[0] == c1.tau and torch.equal(shrink(x * 1.1, d2[0]), d1[0]) and d1[1] == d2[1]
    # an in-place change of x, or of the sparse weights, after the forward is caught, as for a
    # dense layer (autograd leaves that check to the saved-tensor hooks)
    for changed in ("input", "weights"):
        h, wr = x.clone().requires_grad_() * 1.0, ws.clone().requires_grad_()
        y = swat(layer, h, wr, tau)
        with torch.no_grad():
            (h if changed == "input" else wr).mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
