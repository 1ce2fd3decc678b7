from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefl.masks import Mask, default_scope


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)
        self.head = nn.Linear(3, 2)


def test_default_scope_is_conv_and_linear_weights_in_order():
    m = Tiny()
    assert default_scope(m) == ["conv.weight", "fc.weight", "head.weight"]
    assert default_scope(m, keep_first=True, keep_last=True) == ["fc.weight"]


def test_density_counts_and_layer_density():
    mk = Mask({"a": torch.tensor([True, False, True, True]), "b": torch.zeros(2, 2, dtype=torch.bool)})
    assert mk.numel() == 8 and mk.num_kept() == 3
    assert mk.density() == pytest.approx(3 / 8) and mk.sparsity() == pytest.approx(5 / 8)
    assert mk.layer_density() == {"a": 0.75, "b": 0.0}


def test_apply_zeroes_removed_coordinates_only():
    m = Tiny()
    mask = Mask.for_model(m)
    w = mask["fc.weight"].clone()
    w[0] = False
    mask = Mask({**mask.to_dict(), "fc.weight": w})
    before = m.fc.weight.detach().clone()
    mask.apply_to_model_(m)
    assert torch.all(m.fc.weight[0] == 0)
    assert torch.equal(m.fc.weight[1:], before[1:])


def test_check_rejects_unknown_names_and_wrong_shapes():
    sd = Tiny().state_dict()
    with pytest.raises(ValueError, match="does not have"):
        Mask({"nope": torch.ones(1, dtype=torch.bool)}).check(sd)
    with pytest.raises(ValueError, match="shape"):
        Mask({"fc.weight": torch.ones(2, dtype=torch.bool)}).check(sd)


def test_union_intersection_and_equality():
    a = Mask({"x": torch.tensor([True, False, False])})
    b = Mask({"x": torch.tensor([False, True, False]), "y": torch.tensor([True])})
    assert a.union(b)["x"].tolist() == [True, True, False]
    assert a.intersection(b)["x"].tolist() == [False, False, False]
    assert a.union(b)["y"].tolist() == [True]
    assert a == Mask({"x": torch.tensor([1.0, 0.0, 0.0])})


def test_non_binary_float_mask_is_rejected():
    with pytest.raises(ValueError):
        Mask({"x": torch.tensor([0.5])})


def test_save_load_round_trip(tmp_path):
    mk = Mask({"a.weight": torch.rand(3, 4) > 0.5, "b": torch.tensor([True])})
    mk.save(tmp_path / "m.safetensors")
    assert Mask.load(tmp_path / "m.safetensors") == mk
