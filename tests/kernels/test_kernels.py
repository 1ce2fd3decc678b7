"""Correctness of sparsefl.kernels: every fast path equals its masked reference.

No timing here: performance claims live in benchmarks/speed.py only.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from sparsefl.accounting import profile_model
from sparsefl.config import ModelConfig
from sparsefl.kernels import choice
from sparsefl.kernels.masked import CsrLinears
from sparsefl.kernels.skeleton import (
    CompactSkeleton,
    SkeletonConvFn,
    skeleton_batch_norm,
    skeleton_conv,
    skeleton_linear,
)
from sparsefl.kernels.sparse_linear import CsrPattern, csr_linear, masked_linear
from sparsefl.kernels.structured import compact, expand
from sparsefl.methods.fedskel import SkeletonHooks, skeleton_layers
from sparsefl.methods.static_mask import StaticMaskHooks
from sparsefl.models import build_model
from sparsefl.runtime.client import train_step
from sparsefl.runtime.sgd import SGD


def _keep(c: int, k: int, seed: int = 0) -> torch.Tensor:
    m = torch.zeros(c, dtype=torch.bool)
    m[torch.randperm(c, generator=torch.Generator().manual_seed(seed))[:k]] = True
    return m


@pytest.mark.parametrize("channels", [10, 40], ids=["dense-kernel", "gathered"])
@pytest.mark.parametrize("handoff", [False, True])
@pytest.mark.parametrize("stride,padding,bias", [(1, 1, False), (2, 1, True), (1, 0, True)])
def test_skeleton_conv_and_bn_grads_equal_masked_reference(
    stride: int, padding: int, bias: bool, handoff: bool, channels: int
) -> None:
    """Both backward kernels (3 skeleton channels of 10 pad to all 10: the dense kernel with
    masked filters; of 40, the gathered skeleton) give the masked reference's gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, channels, 3, stride=stride, padding=padding, bias=bias).double()
    bn = nn.BatchNorm2d(channels).double()
    keep = _keep(channels, 3)
    idx = torch.nonzero(keep).flatten()
    x = torch.randn(4, 6, 9, 9, dtype=torch.double, requires_grad=True)

    def run(compact_path: bool, other_use: bool) -> list[torch.Tensor]:
        for t in (x, *conv.parameters(), *bn.parameters()):
            t.grad = None
        if compact_path:
            box: dict[str, torch.Tensor] | None = {} if handoff else None
            h = skeleton_conv(x, conv, idx, handoff=box)
            y = skeleton_batch_norm(h, bn, idx, box)
        else:
            h = conv(x)
            h.register_hook(lambda g: g.masked_fill(~keep.view(1, -1, 1, 1), 0))
            y = bn(h)
        loss = (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape).cos()).sum()
        if other_use:  # the conv's output has a second consumer: its gradient adds to the handed one
            loss = loss + (h.sin() * 3).sum()
        loss.backward()
        return [t.grad.clone() for t in (x, *conv.parameters(), *bn.parameters())]

    for other_use in (False, True):
        for a, b in zip(run(False, other_use), run(True, other_use)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_skeleton_bn_handoff_skips_the_full_input_gradient() -> None:
    """With a handoff the BatchNorm returns no input gradient through autograd; the conv
    backward gets None from autograd and the skeleton rows from the handoff (bit for bit the
    gradients of the path that scatters into zeros and gathers again)."""
    torch.manual_seed(2)
    conv, bn = nn.Conv2d(4, 64, 3, padding=1), nn.BatchNorm2d(64)  # 4 of 64 channels: gathered
    idx = torch.tensor([1, 5, 6, 12])
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    got: dict[str, object] = {}
    orig = SkeletonConvFn.backward

    def spy(ctx, gy):  # type: ignore[no-untyped-def]
        got["gy"] = gy
        return orig(ctx, gy)

    grads = []
    for box in (None, {}):
        for t in (x, *conv.parameters(), *bn.parameters()):
            t.grad = None
        SkeletonConvFn.backward = staticmethod(spy)  # type: ignore[method-assign]
        try:
            y = skeleton_batch_norm(skeleton_conv(x, conv, idx, handoff=box), bn, idx, box)
            (y * y.detach().cos()).sum().backward()
        finally:
            SkeletonConvFn.backward = staticmethod(orig)  # type: ignore[method-assign]
        assert (got["gy"] is None) == (box is not None)
        assert box is None or box == {}  # taken by the conv's backward
        grads.append([t.grad.clone() for t in (x, *conv.parameters(), *bn.parameters())])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_skeleton_linear_grads_equal_masked_reference() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(7, 12)
    keep = _keep(12, 4)
    x = torch.randn(5, 7, requires_grad=True)
    gy = torch.randn(5, 12)
    lin(x).backward(gy * keep)
    ref = [t.grad.clone() for t in (x, lin.weight, lin.bias)]
    for t in (x, lin.weight, lin.bias):
        t.grad = None
    skeleton_linear(x, lin, torch.nonzero(keep).flatten()).backward(gy)
    for a, b in zip(ref, [t.grad for t in (x, lin.weight, lin.bias)]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _train_fedskel(backward: str, bn: str, steps: int = 6, bf16: bool = False) -> dict[str, torch.Tensor]:
    model = build_model(ModelConfig(name="resnet8"), (3, 8, 8), 10, 0)
    prof = profile_model(model, (3, 8, 8))
    layers = skeleton_layers(model, False, bn)
    params = dict(model.named_parameters())
    skel = {
        la.name: _keep(params[la.name].shape[0], max(1, params[la.name].shape[0] // 4), i)
        for i, la in enumerate(layers)
    }
    hooks = SkeletonHooks(model, prof, layers, 0.25, skel, 1, mask_bn_output=bn == "skeleton", backward=backward)
    opt = SGD(hooks.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(3)
    try:
        for s in range(steps):
            x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
            train_step(hooks, opt, x, y, s, bf16)
    finally:
        hooks.close()
    assert "forward" not in dict(model.named_modules())["conv1"].__dict__  # restored
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bn", ["train", "skeleton"])
def test_fedskel_compact_training_equals_mask_reference(bn: str) -> None:
    ref = _train_fedskel("mask", bn)
    new = _train_fedskel("compact", bn)
    for k in ref:
        torch.testing.assert_close(new[k].double(), ref[k].double(), atol=1e-5, rtol=0)


def test_a_skeleton_too_wide_to_gather_runs_the_dense_kernel_with_masked_filters() -> None:
    """A 2-channel skeleton of a 16-channel conv pads to all 16 channels (CHANNEL_ALIGN): its
    backward runs the dense kernel with the other filters zeroed, and its BatchNorm keeps the
    module's own backward (the conv needs the full output gradient); in a 64-channel conv the
    skeleton is gathered, and its BatchNorm computes the skeleton channels' input gradient."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64))
    keep = {"0.weight": _keep(16, 2), "2.weight": _keep(64, 6)}
    cs = CompactSkeleton(model, [("0.weight", "0", "1"), ("2.weight", "2", "3")])
    cs.install(keep)
    assert cs.active("0.weight") and cs.active("2.weight")
    assert "forward" not in model[1].__dict__ and "forward" in model[3].__dict__
    cs.remove()


def test_fedskel_compact_training_in_bf16_follows_the_mask_reference() -> None:
    """Under bf16 autocast (bf16 activations, fp32 BatchNorm parameters) the compact kernels run
    and stay within bf16 rounding of the masked reference."""
    ref = _train_fedskel("mask", "train", steps=3, bf16=True)
    new = _train_fedskel("compact", "train", steps=3, bf16=True)
    for k in ref:
        if ref[k].is_floating_point():
            torch.testing.assert_close(new[k].double(), ref[k].double(), atol=3e-2, rtol=0)


def test_csr_linear_equals_dense_masked_forward_and_grads() -> None:
    torch.manual_seed(2)
    m = torch.rand(33, 20) < 0.15
    w = torch.randn(33, 20, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    x = torch.randn(6, 20, requires_grad=True)
    gy = torch.randn(6, 33)
    y_ref = masked_linear(x, w, b, m)
    y_ref.backward(gy)
    ref = (x.grad.clone(), (w.grad * m).clone(), b.grad.clone())
    x.grad = b.grad = None
    pat = CsrPattern.from_mask(m)
    vals = nn.Parameter(pat.gather(w))
    y = csr_linear(x, vals, b, pat)
    y.backward(gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, ref[0])
    torch.testing.assert_close(pat.scatter(vals.grad, torch.empty(33, 20)), ref[1])
    torch.testing.assert_close(b.grad, ref[2])


def test_static_mask_csr_training_equals_dense_masked() -> None:
    def train(kernel: str) -> dict[str, torch.Tensor]:
        model = build_model(ModelConfig(name="mlp"), (1, 8, 8), 10, 0)
        prof = profile_model(model, (1, 8, 8))
        g = torch.Generator().manual_seed(5)
        sd = model.state_dict()
        mask = {n: torch.rand(sd[n].shape, generator=g) >= 0.9 for n in ("fc1.weight", "fc2.weight")}
        hooks = StaticMaskHooks(model, prof, mask, kernel, 16)  # type: ignore[arg-type]
        opt = SGD(hooks.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        try:
            for s in range(5):
                x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
                train_step(hooks, opt, x, y, s)
        finally:
            hooks.close()
        if kernel == "csr":
            assert set(hooks._csr.layers) == {"fc1.weight", "fc2.weight"}
        return {k: v.clone() for k, v in model.state_dict().items()}

    ref, new = train("dense"), train("csr")
    for k in ref:
        torch.testing.assert_close(new[k], ref[k], atol=1e-5, rtol=0)
        if k in ("fc1.weight", "fc2.weight"):
            assert torch.equal(new[k] == 0, ref[k] == 0)


class _Clock:
    """A fake clock: a candidate's call advances it by the candidate's scripted cost."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def tick(self, cost: float):  # type: ignore[no-untyped-def]
        def run() -> None:
            self.t += cost

        return run


def test_kernel_choice_never_picks_a_slower_path() -> None:
    """A fake timer: each call of a candidate advances the clock by its scripted cost."""
    for costs in itertools.product([1.0, 0.5, 0.95, 2.0], repeat=2):
        clock = _Clock()
        choice.clear_cache()
        cands = {"dense": clock.tick(1.0), "csr": clock.tick(costs[0]), "bsr": clock.tick(costs[1])}
        got = choice.choose(("k", costs), cands, timer=clock.now, margin=1.1)
        cost = {"dense": 1.0, "csr": costs[0], "bsr": costs[1]}
        assert cost[got] <= 1.0
        assert got == "dense" or cost[got] * 1.1 < 1.0
        if min(costs) * 1.1 < 1.0:
            assert cost[got] == min(costs)

    def broken() -> None:
        raise RuntimeError("no kernel")

    choice.clear_cache()
    assert choice.choose("b", {"dense": lambda: None, "csr": broken}) == "dense"
    assert choice.cached("b") == "dense"
    choice.clear_cache()


def test_csr_linears_dense_mode_installs_nothing() -> None:
    model = build_model(ModelConfig(name="mlp"), (1, 8, 8), 10, 0)
    c = CsrLinears(model, {"fc1.weight": torch.rand(256, 64) > 0.95}, "dense", 32)
    assert not c.layers
    c.close()


@pytest.mark.parametrize("name,shape", [("resnet8", (3, 8, 8)), ("cnn", (1, 8, 8)), ("mlp", (1, 8, 8))])
def test_compact_expand_round_trip(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(name=name), shape, 10, 0)
    g = torch.Generator().manual_seed(0)
    mods = dict(model.named_modules())
    cls = [n for n, m in mods.items() if isinstance(m, nn.Linear)][-1]
    cm = {
        f"{n}.weight": torch.rand(m.weight.shape[0], generator=g) < 0.5
        for n, m in mods.items()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and n != cls
    }
    for v in cm.values():
        v[0] = True
    small, plan = compact(model, cm, shape)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # the compact network equals the big one with removed channels exactly zero downstream
    ref = build_model(ModelConfig(name=name), shape, 10, 0)
    rmods = dict(ref.named_modules())
    names = list(rmods)
    with torch.no_grad():
        for k, keep in cm.items():
            mn = k[: -len(".weight")]
            rmods[mn].weight[~keep] = 0
            if rmods[mn].bias is not None:
                rmods[mn].bias[~keep] = 0
            for n2 in names[names.index(mn) + 1 :]:
                if isinstance(rmods[n2], (nn.Conv2d, nn.Linear)):
                    break
                if isinstance(rmods[n2], nn.BatchNorm2d):
                    rmods[n2].bias[~keep] = 0
                    break
    x = torch.randn(4, *shape)
    torch.testing.assert_close(small(x), ref(x), atol=1e-5, rtol=1e-5)
    # train the small one a bit, expand, compact again: the same small network
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    small(x).square().mean().backward()
    opt.step()
    expand(model, small, plan)
    again, _ = compact(model, cm, shape)
    sa, sb = small.state_dict(), again.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_channel_masks_reject_a_mask_that_is_not_whole_rows() -> None:
    from sparsefl.kernels.structured import channel_masks

    ok = torch.zeros(4, 3, 3, 3, dtype=torch.bool)
    ok[[0, 2]] = True
    assert channel_masks({"c.weight": ok})["c.weight"].tolist() == [True, False, True, False]
    bad = ok.clone()
    bad[1, 0, 0, 0] = True
    with pytest.raises(ValueError, match="c.weight.*channel-structured"):
        channel_masks({"c.weight": bad})


@pytest.mark.parametrize("name,shape", [("cnn", (1, 8, 8)), ("resnet8", (3, 8, 8))])
def test_static_mask_compact_training_leaves_the_big_model_computing_the_compact_network(
    name: str, shape: tuple[int, ...]
) -> None:
    model = build_model(ModelConfig(name=name), shape, 10, 0)
    prof = profile_model(model, shape)
    mask = {}
    for i, (n, mod) in enumerate(model.named_modules()):
        if isinstance(mod, nn.Conv2d | nn.Linear) and mod.weight.shape[0] > 10:  # classifier kept whole
            keep = _keep(mod.weight.shape[0], mod.weight.shape[0] // 2, i)
            mask[f"{n}.weight"] = keep.view(-1, *[1] * (mod.weight.dim() - 1)).expand_as(mod.weight).clone()
    hooks = StaticMaskHooks(model, prof, mask, compact=True)
    assert hooks._compact is not None
    d = hooks.densities()
    assert set(mask) <= set(d) and all(0 < v.forward < 1 for v in d.values())  # + layers whose inputs shrank
    opt = SGD(hooks.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)
        train_step(hooks, opt, x, y, step)
    hooks.close()
    small = hooks._compact.small
    model.eval()
    small.eval()
    x = torch.randn(5, *shape, generator=g)
    torch.testing.assert_close(model(x), small(x), atol=1e-5, rtol=1e-5)
    for n, m in mask.items():  # removed rows stay removed
        assert not bool(dict(model.named_parameters())[n].detach()[~m].any())
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert bool((mod.weight == 0).any()) and bool((mod.bias[mod.weight == 0] == 0).all())


def test_static_mask_compact_needs_a_structured_criterion() -> None:
    from sparsefl.config import load_config
    from sparsefl.errors import ConfigError

    with pytest.raises(ConfigError, match="method.compact.*skeletonization"):
        load_config(overrides=["method.name=static_mask", "method.criterion=synflow", "method.compact=true"])
    load_config(overrides=["method.name=static_mask", "method.criterion=skeletonization", "method.compact=true"])


def test_compact_network_is_reused_for_another_model_of_the_same_architecture() -> None:
    from sparsefl.kernels.structured import CompactTraining, channel_masks

    shape = (1, 8, 8)
    a = build_model(ModelConfig(name="cnn"), shape, 10, 0)
    b = build_model(ModelConfig(name="cnn"), shape, 10, 1)  # other weights
    mask = {}
    for i, (n, mod) in enumerate(a.named_modules()):
        if isinstance(mod, nn.Conv2d):
            keep = _keep(mod.weight.shape[0], mod.weight.shape[0] // 2, i)
            mask[f"{n}.weight"] = keep.view(-1, 1, 1, 1).expand_as(mod.weight).clone()
    first = CompactTraining(a, mask, shape)
    second = CompactTraining(b, mask, shape)
    assert second.small is first.small  # cached: no second trace
    fresh, _ = compact(b, channel_masks(mask), shape)
    x = torch.randn(4, *shape)
    second.small.eval()
    fresh.eval()
    torch.testing.assert_close(second.small(x), fresh(x), rtol=0, atol=0)


def test_static_mask_removed_weights_stay_exactly_zero_without_reapplying_the_mask() -> None:
    shape = (1, 8, 8)
    model = build_model(ModelConfig(name="cnn"), shape, 10, 0)
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=g) > 0.7 for n, p in model.named_parameters() if p.dim() > 1}
    hooks = StaticMaskHooks(model, profile_model(model, shape), mask, kernel="dense")
    opt = SGD(hooks.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(5):
        x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)
        train_step(hooks, opt, x, y, step)
    hooks.close()
    params = dict(model.named_parameters())
    for n, m in mask.items():
        assert torch.equal(params[n].detach()[~m], torch.zeros(int((~m).sum())))  # exactly +0.0
        assert bool((params[n].detach()[m] != 0).any())


def test_skeleton_kernels_hand_compact_weight_rows_to_a_sink() -> None:
    """With a sink, the conv and linear kernels return no full weight gradient: the skeleton
    rows' gradient goes to sink[weight], equal to those rows of the full gradient, and a layer
    run twice accumulates there as autograd would."""
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=True)
    lin = nn.Linear(8 * 25, 6)
    idx = torch.tensor([1, 4, 5])
    lidx = torch.tensor([0, 3])
    x = torch.randn(2, 4, 5, 5)

    def loss(sink):  # type: ignore[no-untyped-def]
        h = skeleton_conv(x, conv, idx, sink)
        h = skeleton_conv(h[:, :4], conv, idx, sink)  # the same layer twice
        return skeleton_linear(h.flatten(1), lin, lidx, sink).square().sum()

    loss(None).backward()
    full_c, full_l = conv.weight.grad.clone(), lin.weight.grad.clone()
    conv.weight.grad = lin.weight.grad = None
    sink: dict[torch.Tensor, torch.Tensor] = {}
    loss(sink).backward()
    assert conv.weight.grad is None and lin.weight.grad is None
    torch.testing.assert_close(sink[conv.weight], full_c[idx], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sink[lin.weight], full_l[lidx], rtol=1e-6, atol=1e-7)
    assert conv.bias.grad is not None  # biases keep their (small) full gradients
