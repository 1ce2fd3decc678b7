"""Extreme sparsity: the exact global target is met and no layer is emptied when the minimum
threshold (MT) is on, on deep nets where plain global criteria collapse layers."""

from __future__ import annotations

import math

import pytest

from sparsefl.pruning import prune


@pytest.mark.parametrize("arch", ["resnet20", "vgg16"])
@pytest.mark.parametrize(
    "criterion, options",
    [
        ("global_magnitude", {}),  # Gupta's default MT (0.05 % of N, shrunk to fit at 99 %)
        ("synflow", {"iterations": 2, "min_keep_fraction": 0.0005, "input_shape": (3, 8, 8)}),
    ],
)
def test_99_percent_without_layer_collapse(make, arch, criterion, options):
    model = make(arch, input_shape=(3, 8, 8), width=1.0)
    m = prune(model, criterion, 0.99, **options)
    assert m.num_kept() == m.numel() - math.floor(0.99 * m.numel() + 1e-6)
    kept = {n: int(t.sum()) for n, t in m.items()}
    assert min(kept.values()) >= 1, kept
    # the MT floor is real: every layer keeps at least about budget / L (or is dense)
    floor = min(min(t.numel() for t in m.values()), m.num_kept() // (2 * len(m)))
    assert min(kept.values()) >= floor
