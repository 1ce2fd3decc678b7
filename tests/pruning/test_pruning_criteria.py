"""Per-criterion oracles: small hand-checkable cases and the published equivalences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsefl.masks import default_scope
from sparsefl.pruning import prune, score
from sparsefl.rng import seeded_torch


def _linear(seed: int = 0, fin: int = 4, fout: int = 3, bias: bool = True) -> nn.Module:
    with seeded_torch(seed, "test"):
        return nn.Sequential(nn.Linear(fin, fout, bias=bias))


def test_snip_oracle_on_a_linear_layer():
    # loss = sum(outputs) -> dL/dW[i, j] = sum_x x[j]; SNIP = |W * that|
    model = _linear()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(5, dtype=torch.long)
    s = score(model, "snip", data=(x, y), loss_fn=lambda out, _y: out.sum())
    expect = (model[0].weight.detach() * x.sum(0)).abs()
    torch.testing.assert_close(s["0.weight"], expect)


def test_grasp_matches_explicit_hessian_and_sign_convention():
    model = _linear(fin=5, fout=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    temp = 200.0
    w0 = model[0].weight.detach().clone()
    b0 = model[0].bias.detach().clone()

    def loss(wflat: torch.Tensor) -> torch.Tensor:
        out = x @ wflat.view(3, 5).T + b0
        return nn.functional.cross_entropy(out / temp, y)

    g = torch.autograd.functional.jacobian(loss, w0.flatten())
    h = torch.autograd.functional.hessian(loss, w0.flatten())
    raw = w0.flatten() * (h @ g)  # = -(GraSP's S = -theta * Hg): higher = keep
    expect = (raw / (raw.sum().abs() + 1e-10)).view(3, 5)
    s = score(model, "grasp", data=(x, y), scope=["0.weight"])
    torch.testing.assert_close(s["0.weight"], expect, rtol=1e-4, atol=1e-8)


def test_synflow_oracle_two_linear_layers():
    # R = 1^T |W2| |W1| 1  ->  score(W1[i, j]) = |W1[i, j]| * (1^T |W2|)[i]
    with seeded_torch(3, "test"):
        model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 2, bias=False))
    s = score(model, "synflow", input_shape=(4,))
    w1 = model[0].weight.detach().double().abs()
    w2 = model[2].weight.detach().double().abs()
    torch.testing.assert_close(s["0.weight"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(s["2.weight"], w2 * (w1.sum(1))[None, :])
    assert s["0.weight"].dtype == torch.float64


def test_synflow_float64_survives_a_deep_net(make):
    model = make("resnet20", width=0.5)
    s = score(model, "synflow", input_shape=(1, 8, 8))
    flat = torch.cat([t.flatten() for t in s.values()])
    assert bool(torch.isfinite(flat).all()) and bool((flat > 0).any())


def test_synflow_iterations_keep_removed_weights_removed(make):
    model = make("cnn")
    m1 = prune(model, "synflow", 0.5, input_shape=(1, 8, 8), iterations=2)
    m2 = prune(model, "synflow", 0.9, input_shape=(1, 8, 8), iterations=3, prev_mask=m1)
    for n in m1:
        assert not bool((m2[n] & ~m1[n]).any())
    assert m2.num_kept() == m2.numel() - math.floor(0.9 * m2.numel() + 1e-6)
    # more iterations change the mask (the schedule is doing something)
    one = prune(model, "synflow", 0.95, input_shape=(1, 8, 8), iterations=1)
    many = prune(model, "synflow", 0.95, input_shape=(1, 8, 8), iterations=6)
    assert one != many


def test_prospr_with_zero_steps_equals_snip(make, batch):
    model = make("cnn")
    for mode in ("full", "first_order"):
        p = score(model, "prospr", data=batch, inner_steps=0, mode=mode)
        s = score(model, "snip", data=batch)
        for k in s:
            torch.testing.assert_close(p[k], s[k], rtol=1e-5, atol=1e-9)
        assert prune(model, "prospr", 0.9, data=batch, inner_steps=0, mode=mode) == prune(
            model, "snip", 0.9, data=batch
        )


def test_prospr_first_order_is_grad_after_steps_times_initial_weights():
    # first-order: S = |grad L(theta_M) * theta_0|; check against a hand-written SGD loop
    with seeded_torch(4, "test"):
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    s = score(model, "prospr", data=(x, y), inner_steps=2, inner_lr=0.3, inner_momentum=0.5, mode="first_order")
    ref = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    theta0 = [p.detach().clone() for p in ref]
    vel = [torch.zeros_like(p) for p in ref]
    params = ref
    for _ in range(2):
        out = torch.func.functional_call(model, dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"], params)), (x,))
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), params)
        vel = [0.5 * v + g for v, g in zip(vel, grads)]
        params = [(p - 0.3 * v).detach().requires_grad_(True) for p, v in zip(params, vel)]
    out = torch.func.functional_call(model, dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"], params)), (x,))
    grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), params)
    torch.testing.assert_close(s["0.weight"], (grads[0] * theta0[0]).abs(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(s["2.weight"], (grads[2] * theta0[2]).abs(), rtol=1e-5, atol=1e-8)
    full = score(model, "prospr", data=(x, y), inner_steps=2, inner_lr=0.3, inner_momentum=0.5)
    assert not torch.allclose(full["0.weight"], s["0.weight"])  # the meta-gradient differs


def test_global_magnitude_many_equal_magnitudes_is_exact_and_deterministic():
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    with torch.no_grad():  # only three distinct magnitudes, both signs
        for lin in (model[0], model[2]):
            lin.weight.copy_(torch.randint(-3, 4, lin.weight.shape, generator=gen).float().clamp(-2, 2) / 4)
    n = 20 * 30 + 30 * 10
    for s in (0.3, 0.5, 0.77):
        m = prune(model, "global_magnitude", s, min_keep_fraction=0.0, min_keep=0)
        assert m.num_kept() == n - math.floor(s * n)
        w = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()]).abs()
        kept = torch.cat([m["0.weight"].flatten(), m["2.weight"].flatten()])
        tau = torch.sort(w, descending=True).values[m.num_kept() - 1]
        assert bool((w[kept] >= tau).all()) and bool((w[~kept] <= tau).all())
        assert m == prune(model, "global_magnitude", s, min_keep_fraction=0.0, min_keep=0)


def test_magnitude_and_random_are_per_layer(make):
    model = make("cnn")
    for name in ("magnitude", "random"):
        m = prune(model, name, 0.75)
        for t in m.values():
            assert int(t.sum()) == t.numel() - math.floor(0.75 * t.numel())
    state = model.state_dict()
    m = prune(model, "magnitude", 0.75)
    for n in default_scope(model):
        w = state[n].abs()
        assert bool(w[m[n]].min() >= w[~m[n]].max())
    assert prune(model, "random", 0.5, seed=1) != prune(model, "random", 0.5, seed=2)


def test_lamp_criterion_scores_and_never_empties(make):
    model = make("cnn")
    s = score(model, "lamp")
    for t in s.values():
        assert float(t.max()) == pytest.approx(1.0)
    m = prune(model, "lamp", 0.99, min_keep=0)
    assert all(bool(t.any()) for t in m.values())


@pytest.mark.parametrize("allocation", ["erk", "layerwise", "lamp"])
def test_any_score_with_other_allocations(make, batch, allocation):
    m = prune(make("cnn"), "snip", 0.8, data=batch, allocation=allocation)
    n = m.numel()
    if allocation != "layerwise":
        assert m.num_kept() == n - math.floor(0.8 * n + 1e-6)
