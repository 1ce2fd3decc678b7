"""Allocation rules: exact k-th value, deterministic ties, MT rule, ERK, LAMP, monotone masks,
with hand-computed oracles."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefl.errors import ConfigError
from sparsefl.pruning import allocate, erk_densities, lamp_scores, topk_mask
from sparsefl.pruning.allocation import global_counts, kth_largest, mt_floors, num_kept


def test_num_kept_guards_float_roundoff():
    assert num_kept(100, 0.29) == 71  # 0.29 * 100 = 28.999999999999996
    assert num_kept(10, 0.0) == 10
    assert num_kept(1000, 0.999) == 1
    assert num_kept(7, 0.5) == 4  # floor(3.5) removed


def test_topk_ties_go_to_lower_index_and_count_is_exact():
    x = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    m = topk_mask(x, 3)
    assert m.tolist() == [False, True, True, True, False, False, False]
    for k in range(0, 8):
        assert int(topk_mask(x, k).sum()) == k


def test_topk_nan_ranks_lowest():
    x = torch.tensor([float("nan"), 0.0, -1.0])
    assert topk_mask(x, 2).tolist() == [False, True, True]


def test_global_threshold_is_exact_kth_value_with_many_ties():
    # 3 layers of mostly equal magnitudes: the threshold value is the exact k-th largest and
    # ties at it are kept in (layer order, index) order, so the kept count is exact.
    gen = torch.Generator().manual_seed(0)
    a = torch.full((40, 10), 0.5)
    a[torch.rand(a.shape, generator=gen) < 0.3] = 0.25
    b = torch.full((100,), 0.5)
    c = torch.randint(1, 4, (7, 9), generator=gen).float() / 4  # 0.25, 0.5, 0.75
    scores = {"a": a, "b": b, "c": c}
    flat = torch.cat([a.flatten(), b, c.flatten()])
    for s in (0.1, 0.37, 0.5, 0.8, 0.95):
        mask = allocate(scores, s, min_keep=0)
        k = num_kept(flat.numel(), s)
        assert mask.num_kept() == k
        tau = kth_largest(flat, k)
        assert tau == torch.sort(flat, descending=True).values[k - 1].item()
        kept = torch.cat([mask[n].flatten() for n in scores])
        assert bool((flat[kept] >= tau).all()) and bool((flat[~kept] <= tau).all())
        # ties at tau: the kept ones are exactly the first (k - #above) positions
        tie_pos = torch.nonzero(flat == tau).flatten()
        n_above = int((flat > tau).sum())
        expect = torch.zeros_like(kept)
        expect[flat > tau] = True
        expect[tie_pos[: k - n_above]] = True
        assert torch.equal(kept, expect)


def test_mt_rule_toy_oracle():
    # layer a has large scores, b tiny ones: the plain global top-6 keeps nothing of b
    scores = {
        "a": torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]),
        "b": torch.tensor([0.1, 0.3, 0.2, 0.05]),
        "c": torch.tensor([1.0, 0.9]),
    }
    plain = allocate(scores, 0.5, min_keep=0)  # N=14, K=7
    assert plain.num_kept() == 7 and int(plain["b"].sum()) == 0 and int(plain["c"].sum()) == 0
    # floor 2: b and c are pinned at 2 (their top-2), a keeps the remaining 3 by threshold
    mt = allocate(scores, 0.5, min_keep=2)
    assert mt["a"].tolist() == [True, True, True, False, False, False, False, False]
    assert mt["b"].tolist() == [False, True, True, False]
    assert mt["c"].tolist() == [True, True]
    assert mt.num_kept() == 7
    # fractional floor: floor(0.15 * 14) = 2 -> same result
    assert allocate(scores, 0.5, min_keep=0, min_keep_fraction=0.15) == mt
    # a layer smaller than the floor stays dense
    assert mt_floors({"a": 8, "b": 4, "c": 2}, min_keep=3) == {"a": 3, "b": 3, "c": 2}


def test_mt_fractional_floor_shrinks_to_fit_and_hard_floor_errors():
    sizes = {"a": 1000, "b": 1000, "c": 1000}
    # 10% of N = 300 per layer would need 900 > budget 60: lowered to 20 each
    assert mt_floors(sizes, 1, 0.1, budget=60) == {"a": 20, "b": 20, "c": 20}
    scores = {n: torch.rand(s, generator=torch.Generator().manual_seed(1)) for n, s in sizes.items()}
    with pytest.raises(ConfigError, match="min_keep"):
        allocate(scores, 0.99, min_keep=11)  # 3 * 11 > 30 kept


def test_global_counts_exact_with_floors():
    gen = torch.Generator().manual_seed(2)
    scores = {f"l{i}": torch.rand(50 * (i + 1), generator=gen) * (10**i) for i in range(4)}
    counts = global_counts(scores, 40, {n: 5 for n in scores})
    assert sum(counts.values()) == 40 and min(counts.values()) >= 5


def test_layerwise_is_exact_per_layer():
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(10, 7, generator=gen), "b": torch.rand(33, generator=gen)}
    m = allocate(scores, 0.6, allocation="layerwise")
    assert int(m["a"].sum()) == 70 - 42 and int(m["b"].sum()) == 33 - 19
    # and per layer it keeps the top scores
    assert bool(scores["a"][m["a"]].min() >= scores["a"][~m["a"]].max())


def test_erk_densities_two_layer_oracle():
    # A: 10x20 (sum 30, prod 200, ratio 0.15); B: 20x40 (sum 60, prod 800, ratio 0.075)
    # density 0.5 of N=1000: eps * (0.15 * 200 + 0.075 * 800) = 500 -> eps = 500 / 90
    d = erk_densities({"A": (10, 20), "B": (20, 40)}, 0.5)
    assert d["A"] == pytest.approx(0.15 * 500 / 90)
    assert d["B"] == pytest.approx(0.075 * 500 / 90)
    assert d["A"] * 200 + d["B"] * 800 == pytest.approx(500)


def test_erk_dense_layer_redistribution():
    # small layer (ratio 0.5) would get density > 1: it is made dense and eps re-solved
    # A: 2x2 (sum 4, prod 4 -> ratio 1.0), B: 100x100 (ratio 0.02); density 0.1 of N=10004
    d = erk_densities({"A": (2, 2), "B": (100, 100)}, 0.1)
    assert d["A"] == 1.0
    assert d["B"] == pytest.approx((0.1 * 10004 - 4) / 10000)
    assert erk_densities({"A": (2, 2)}, 1.0) == {"A": 1.0}


def test_erk_allocation_exact_global_and_near_per_layer():
    gen = torch.Generator().manual_seed(4)
    shapes = {"c1": (8, 3, 3, 3), "c2": (16, 8, 3, 3), "fc": (10, 64)}
    scores = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    m = allocate(scores, 0.8, allocation="erk")
    n = sum(math.prod(s) for s in shapes.values())
    assert m.num_kept() == num_kept(n, 0.8)
    dens = erk_densities(shapes, 0.2)
    for name, s in shapes.items():
        assert abs(int(m[name].sum()) - dens[name] * math.prod(s)) <= 1


def test_lamp_scores_four_element_oracle():
    # w = [1, -2, 3, 4]; w^2 = 1, 4, 9, 16; suffix sums 30, 29, 25, 16
    w = torch.tensor([1.0, -2.0, 3.0, 4.0])
    s = lamp_scores({"w": w**2})["w"]
    assert s.tolist() == pytest.approx([1 / 30, 4 / 29, 9 / 25, 1.0])
    # permutation-equivariant, and the largest of each layer scores 1
    s2 = lamp_scores({"w": (w**2)[[3, 0, 2, 1]]})["w"]
    assert s2.tolist() == pytest.approx([1.0, 1 / 30, 9 / 25, 4 / 29])


def test_lamp_allocation_rejects_negative_scores():
    with pytest.raises(ConfigError, match="lamp"):
        allocate({"a": torch.tensor([1.0, -1.0])}, 0.5, allocation="lamp")


def test_prev_mask_is_monotone_and_cannot_grow():
    gen = torch.Generator().manual_seed(5)
    scores = {"a": torch.rand(100, generator=gen), "b": torch.rand(50, generator=gen)}
    m1 = allocate(scores, 0.5)
    # new scores that favour the removed weights: still only survivors are kept
    flipped = {n: 1 - s for n, s in scores.items()}
    for allocation in ("global", "layerwise", "erk", "lamp"):
        m2 = allocate(flipped, 0.8, allocation=allocation, prev_mask=m1)
        assert m2.num_kept() <= m1.num_kept()
        for n in scores:
            assert not bool((m2[n] & ~m1[n]).any()), allocation
    with pytest.raises(ConfigError, match="masks only shrink"):
        allocate(scores, 0.3, prev_mask=m1)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_bad_sparsity(bad):
    with pytest.raises(ConfigError, match="sparsity"):
        allocate({"a": torch.rand(10)}, bad)


def test_unknown_allocation():
    with pytest.raises(ConfigError, match="one of: global, layerwise, erk, lamp"):
        allocate({"a": torch.rand(10)}, 0.5, allocation="nope")
