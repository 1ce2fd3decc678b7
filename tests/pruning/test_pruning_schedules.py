"""Schedules: Zhu & Gupta's cubic ramp and SynFlow's exponential densities."""

from __future__ import annotations

import pytest

from sparsefl.errors import ConfigError
from sparsefl.pruning import exponential_densities, gradual_sparsity


def test_gradual_cubic_values():
    assert gradual_sparsity(0, 10, 0.9) == 0.0
    assert gradual_sparsity(10, 10, 0.9) == 0.9
    assert gradual_sparsity(25, 10, 0.9) == 0.9
    # s_t = s_f + (s_i - s_f)(1 - t/n)^3 = 0.9 - 0.9 * 0.5^3
    assert gradual_sparsity(5, 10, 0.9) == pytest.approx(0.9 - 0.9 * 0.125)
    assert gradual_sparsity(5, 10, 0.9, initial_sparsity=0.5) == pytest.approx(0.9 - 0.4 * 0.125)
    assert gradual_sparsity(5, 10, 0.9, power=1) == pytest.approx(0.45)
    assert gradual_sparsity(3, 10, 0.9, begin_step=5) == 0.0
    values = [gradual_sparsity(t, 20, 0.95) for t in range(21)]
    assert values == sorted(values)


def test_gradual_validates():
    with pytest.raises(ConfigError):
        gradual_sparsity(1, 0, 0.9)
    with pytest.raises(ConfigError):
        gradual_sparsity(1, 10, 1.0)


def test_exponential_densities():
    d = exponential_densities(0.01, 4)
    assert d == pytest.approx([0.01**0.25, 0.01**0.5, 0.01**0.75, 0.01])
    assert d[-1] == 0.01
    assert exponential_densities(0.2, 2, initial_density=0.8) == pytest.approx([0.4, 0.2])
    with pytest.raises(ConfigError):
        exponential_densities(0.5, 0)


def test_gradual_global_magnitude_over_rounds(make):
    """Gradual Global MP: prune each round to the cubic target, monotone via prev_mask."""
    import math

    import torch

    from sparsefl.pruning import prune

    model = make("cnn")
    mask = None
    for r in range(1, 6):
        s = gradual_sparsity(r, 5, 0.9)
        new = prune(model, "global_magnitude", s, prev_mask=mask)
        assert new.num_kept() == new.numel() - math.floor(s * new.numel() + 1e-6)
        if mask is not None:
            assert all(not bool((new[n] & ~mask[n]).any()) for n in new)
        mask = new
        with torch.no_grad():  # "fine-tune": perturb the surviving weights between rounds
            for n, p in model.named_parameters():
                if n in mask:
                    p.mul_(1 + 0.1 * torch.sin(torch.arange(p.numel()).view_as(p).float()))
    assert mask is not None and abs(mask.sparsity() - 0.9) < 1e-3
