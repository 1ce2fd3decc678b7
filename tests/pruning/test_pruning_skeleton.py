"""Skeletonization: relevance oracle, structured masks, channel info."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsefl.errors import ConfigError
from sparsefl.pruning import channel_mask, prune, skeletonize
from sparsefl.pruning.criteria.skeletonization import linear_error
from sparsefl.rng import seeded_torch


def _mlp() -> nn.Module:
    with seeded_torch(0, "test"):
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def test_relevance_is_minus_derivative_of_linear_error():
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 6, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    sk = skeletonize(model, 0.3, data=(x, y))
    # oracle: alpha on the hidden layer's outputs, differentiated by hand-written forward
    alpha = torch.ones(5, requires_grad=True)
    beta = torch.ones(4, requires_grad=True)
    h = torch.tanh(model[0](x) * alpha)
    out = model[2](h) * beta
    err = linear_error(out, y)
    ga, gb = torch.autograd.grad(err, [alpha, beta])
    torch.testing.assert_close(sk.relevance["0.weight"], -ga)
    torch.testing.assert_close(sk.relevance["2.weight"], -gb)
    # the linear error is sum_c |t - softmax(o)|, averaged over samples
    p = torch.softmax(out.detach(), 1)
    t = nn.functional.one_hot(y, 4).float()
    assert float(linear_error(out.detach(), y)) == pytest.approx(float((t - p).abs().sum(1).mean()))


def test_structured_mask_within_one_channel(make, batch):
    model = make("cnn", width=0.5)
    state = model.state_dict()
    for s in (0.3, 0.7, 0.95):
        sk = skeletonize(model, s, data=batch)
        m = sk.mask
        target = m.numel() - math.floor(s * m.numel())
        rows = {n: math.prod(state[n].shape[1:]) for n in m}
        assert abs(m.num_kept() - target) <= max(rows.values())
        for n, t in m.items():
            r = t.reshape(t.shape[0], -1)
            assert bool((r.all(1) | ~r.any(1)).all())
            assert int(sk.channel_mask[n].sum()) >= 1
            assert torch.equal(channel_mask(m)[n], sk.channel_mask[n])
        # the removed channels are the least relevant ones that were removable
        assert m == prune(model, "skeletonization", s, data=batch)


def test_min_channels_and_error_options(make, batch):
    model = make("cnn", width=0.5)
    sk = skeletonize(model, 0.95, data=batch, min_channels=3)
    assert all(int(c.sum()) >= 3 for c in sk.channel_mask.values())
    ce = skeletonize(model, 0.5, data=batch, error="ce")
    lin = skeletonize(model, 0.5, data=batch)
    assert any(not torch.equal(ce.relevance[n], lin.relevance[n]) for n in lin.relevance)
    with pytest.raises(ConfigError, match="error"):
        skeletonize(model, 0.5, data=batch, error="quadratic")


def test_structured_scores_are_rows(make, batch):
    from sparsefl.pruning import score

    s = score(make("cnn"), "skeletonization", data=batch)
    for t in s.values():
        r = t.reshape(t.shape[0], -1)
        assert torch.equal(r, r[:, :1].expand_as(r))
