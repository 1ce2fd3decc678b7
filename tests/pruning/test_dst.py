"""Dynamic sparse training steps: exact per-layer counts, no drop-then-regrow, RigL's choice by
gradient, SET's determinism per generator, the cosine schedule, with hand-computed oracles."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefl.errors import ConfigError
from sparsefl.masks import Mask
from sparsefl.pruning import cosine_fraction, drop_and_grow, rigl_step, set_step
from sparsefl.pruning.dst import dense_grads, dropped, grown, vote_shares


def _random_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (8, 5), "b.weight": (4, 3, 3, 3), "c.weight": (10, 7)}
    w = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    mask = Mask({n: torch.rand(s, generator=g) < 0.3 for n, s in shapes.items()})
    return mask, {n: w[n] * mask[n] for n in w}, grads


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_density_is_preserved_per_layer_and_dropped_are_not_regrown(fraction):
    mask, w, grads = _random_case()
    new = rigl_step(mask, w, grads, fraction)
    assert set(new) == set(mask)
    for n in mask:
        kept = int(mask[n].sum())
        assert int(new[n].sum()) == kept
        k = min(math.floor(fraction * kept + 1e-9), mask[n].numel() - kept)
        assert int(grown(mask, new)[n].sum()) == k
        assert int(dropped(mask, new)[n].sum()) == k
        # a weight dropped in this step is not among the regrown ones
        assert not bool((dropped(mask, new)[n] & new[n]).any())


def test_hand_computed_oracle_magnitude_out_gradient_in():
    m = Mask({"w": torch.tensor([True, True, True, True, False, False, False, False])})
    w = {"w": torch.tensor([0.9, -0.1, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0])}
    g = {"w": torch.tensor([9.0, 9.0, 9.0, 9.0, 0.1, -3.0, 0.2, 2.0])}
    new = rigl_step(m, w, g, 0.5)  # k = 2: drop -0.1 and 0.2, grow |-3.0| and 2.0
    assert new["w"].tolist() == [True, False, True, False, False, True, False, True]


def test_ties_break_by_lower_index_and_drop_scores_replace_magnitude():
    m = Mask({"w": torch.tensor([True, True, True, False, False, False])})
    w = {"w": torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])}
    g = {"w": torch.ones(6)}
    new = drop_and_grow(m, w, g, 1 / 3)  # k = 1: all ties; the survivor set takes lower indices
    assert new["w"].tolist() == [True, True, False, True, False, False]
    ds = {"w": torch.tensor([0.0, 5.0, 5.0, 0.0, 0.0, 0.0])}
    new = drop_and_grow(m, w, g, 1 / 3, drop_scores=ds)
    assert new["w"].tolist() == [False, True, True, True, False, False]


def test_rigl_regrows_the_largest_gradients():
    mask, w, grads = _random_case(1)
    new = rigl_step(mask, w, grads, 0.4)
    for n in mask:
        g_new = grown(mask, new)[n]
        if not g_new.any():
            continue
        cand = ~mask[n] & ~g_new
        assert float(grads[n].abs()[g_new].min()) >= float(grads[n].abs()[cand].max())
        survivors = mask[n] & new[n]
        gone = dropped(mask, new)[n]
        assert float(w[n].abs()[survivors].min()) >= float(w[n].abs()[gone].max())


def test_a_dense_layer_and_an_empty_layer_do_not_change():
    m = Mask({"d": torch.ones(5, dtype=torch.bool), "e": torch.zeros(5, dtype=torch.bool)})
    w = {"d": torch.arange(5.0), "e": torch.zeros(5)}
    new = rigl_step(m, w, {"d": torch.ones(5), "e": torch.ones(5)}, 0.5)
    assert new == m


def test_per_layer_fraction_mapping():
    mask, w, grads = _random_case(2)
    new = rigl_step(mask, w, grads, {"a.weight": 0.0, "b.weight": 0.5, "c.weight": 0.0})
    assert torch.equal(new["a.weight"], mask["a.weight"]) and torch.equal(new["c.weight"], mask["c.weight"])
    assert not torch.equal(new["b.weight"], mask["b.weight"])


def test_set_is_deterministic_per_generator():
    mask, w, _ = _random_case(3)
    a = set_step(mask, w, 0.3, torch.Generator().manual_seed(7))
    b = set_step(mask, w, 0.3, torch.Generator().manual_seed(7))
    c = set_step(mask, w, 0.3, torch.Generator().manual_seed(8))
    assert a == b
    assert a != c
    for n in mask:
        assert int(a[n].sum()) == int(mask[n].sum())


def test_bad_fraction_is_a_config_error():
    mask, w, grads = _random_case()
    with pytest.raises(ConfigError, match="fraction"):
        rigl_step(mask, w, grads, 1.5)


def test_cosine_fraction_endpoints():
    assert cosine_fraction(0, 10, 0.3) == pytest.approx(0.3)
    assert cosine_fraction(5, 10, 0.3) == pytest.approx(0.15)
    assert cosine_fraction(10, 10, 0.3) == 0.0
    assert cosine_fraction(12, 10, 0.3) == 0.0
    vals = [cosine_fraction(t, 10, 0.3) for t in range(11)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))


def test_vote_shares_are_sample_weighted():
    like = Mask({"w": torch.zeros(3, dtype=torch.bool)})
    masks = [{"w": torch.tensor([True, False, True])}, {"w": torch.tensor([True, True, False])}, {}]
    v = vote_shares(masks, [1, 3, 4], like)["w"]
    assert v.tolist() == [0.5, 0.375, 0.125]


def test_dense_grads_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    g = dense_grads(model, x, y, ["0.weight", "2.weight"])
    assert set(g) == {"0.weight", "2.weight"} and g["0.weight"].shape == (3, 4)
    assert bool(g["0.weight"].abs().sum() > 0)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
