"""Rate-distortion pruning: the DP on toy tables, curves, exactness, monotone iteration."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefl.errors import SparseflError
from sparsefl.masks import default_scope
from sparsefl.pruning import prune, rd_curves, rd_dp_allocate


def test_dp_toy_table_oracle():
    table = {
        "A": [(10, 0.0), (5, 1.0), (0, 5.0)],
        "B": [(10, 0.0), (5, 0.5), (0, 3.0)],
    }
    # budget 10: A10+B0 = 3.0, A5+B5 = 1.5, A0+B10 = 5.0 -> A5, B5
    assert rd_dp_allocate(table, 10) == {"A": 5, "B": 5}
    # budget 15: A10+B5 = 0.5 beats A5+B10 = 1.0
    assert rd_dp_allocate(table, 15) == {"A": 10, "B": 5}
    # budget 20: nothing pruned
    assert rd_dp_allocate(table, 20) == {"A": 10, "B": 10}
    with pytest.raises(SparseflError):
        rd_dp_allocate({"A": [(10, 0.0), (5, 1.0)]}, 4)


def test_dp_three_layers_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    table = {}
    for name, n in (("a", 30), ("b", 50), ("c", 20)):
        kept = [n - math.floor(i / 5 * n) for i in range(6)]
        dist = sorted(torch.rand(6, generator=gen).tolist())
        table[name] = list(zip(kept, dist))
    for budget in (20, 37, 55, 80, 100):
        best = min(
            (da + db + dc, (ka, kb, kc))
            for ka, da in table["a"]
            for kb, db in table["b"]
            for kc, dc in table["c"]
            if ka + kb + kc <= budget
        )
        got = rd_dp_allocate(table, budget)
        assert sum(table[n][[k for k, _ in table[n]].index(got[n])][1] for n in got) == pytest.approx(best[0])
        assert sum(got.values()) <= budget


def test_dp_bucketing_never_overshoots():
    table = {f"l{i}": [(1000 - 37 * j, j * (i + 1.0)) for j in range(20)] for i in range(5)}
    for buckets in (7, 64, 4096):
        got = rd_dp_allocate(table, 3333, buckets=buckets)
        assert sum(got.values()) <= 3333


def test_curves_start_at_zero_and_cover_the_grid(make, batch):
    model = make("cnn")
    net = __import__("copy").deepcopy(model).eval()
    scope = default_scope(model)
    curves = rd_curves(net, scope, batch[0][:16], grid=5)
    for n, c in curves.items():
        size = model.state_dict()[n].numel()
        assert c.kept[0] == size and c.distortion[0] == 0.0
        assert c.kept == sorted(c.kept, reverse=True) and c.kept[-1] == 1
        assert all(d >= 0 for d in c.distortion)
    for k, v in model.state_dict().items():  # the copy was restored
        assert torch.equal(net.state_dict()[k], v)


@pytest.mark.parametrize("sparsity", [0.6, 0.97])
def test_rd_exact_and_never_empties(make, batch, sparsity):
    model = make("resnet8", width=0.5)
    m = prune(model, "rd", sparsity, data=batch, grid=10, calib_samples=32)
    assert m.num_kept() == m.numel() - math.floor(sparsity * m.numel() + 1e-6)
    assert all(bool(t.any()) for t in m.values())


def test_rd_bucketed_dp_still_exact(make, batch):
    model = make("cnn")
    m = prune(model, "rd", 0.7, data=batch, grid=6, calib_samples=16, buckets=16)
    assert m.num_kept() == m.numel() - math.floor(0.7 * m.numel() + 1e-6)


def test_rd_iterative_is_monotone(make, batch):
    model = make("cnn")
    opts = {"grid": 6, "calib_samples": 16}
    m1 = prune(model, "rd", 0.5, data=batch, **opts)
    m2 = prune(model, "rd", 0.8, data=batch, prev_mask=m1, **opts)
    for n in m1:
        assert not bool((m2[n] & ~m1[n]).any())
        # a layer's amount never goes below its previous amount
        assert int(m2[n].sum()) <= int(m1[n].sum())
    assert m2.num_kept() == m2.numel() - math.floor(0.8 * m2.numel() + 1e-6)
    m3 = prune(model, "rd", 0.8, data=batch, iterations=3, **opts)
    assert m3.num_kept() == m2.num_kept()


def test_rd_data_free_uses_random_inputs(make):
    model = make("cnn")
    a = prune(model, "rd", 0.8, input_shape=(1, 8, 8), grid=5, calib_samples=16, seed=1)
    b = prune(model, "rd", 0.8, input_shape=(1, 8, 8), grid=5, calib_samples=16, seed=1)
    assert a == b and a.num_kept() == a.numel() - math.floor(0.8 * a.numel() + 1e-6)


def test_rd_mask_tops_up_by_global_magnitude():
    from sparsefl.pruning import rd_mask

    w = {"a": torch.tensor([0.1, -0.5, 0.3, 0.9]), "b": torch.tensor([0.2, -0.8])}
    m = rd_mask(w, {"a": 1, "b": 1}, 4)
    assert m["a"].tolist() == [False, True, True, True] and m["b"].tolist() == [False, True]
    prev = {"a": torch.tensor([True, False, True, True]), "b": torch.tensor([True, True])}
    m = rd_mask(w, {"a": 1, "b": 1}, 4, prev_mask=prev)  # -0.5 was removed before: 0.3, 0.2
    assert m["a"].tolist() == [False, False, True, True] and m["b"].tolist() == [True, True]
