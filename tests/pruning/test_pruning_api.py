"""The public API: errors in the user's language, scope handling, data forms, the score/allocate
split."""

from __future__ import annotations

import pytest
import torch

from sparsefl.errors import ConfigError
from sparsefl.masks import default_scope
from sparsefl.pruning import allocate, prune, score
from sparsefl.registry import CRITERIA


def test_unknown_criterion_lists_the_valid_ones(make):
    with pytest.raises(ConfigError) as e:
        prune(make("mlp", input_shape=(64,)), "nope", 0.5)
    for name in CRITERIA.names():
        assert name in str(e.value)


@pytest.mark.parametrize("bad", [-0.01, 1.0, 2, float("inf"), "0.9", None, False])
def test_bad_sparsity_is_a_config_error(make, bad):
    with pytest.raises(ConfigError, match="sparsity"):
        prune(make("mlp", input_shape=(64,)), "magnitude", bad)


@pytest.mark.parametrize("name", [n for n in CRITERIA.names() if CRITERIA.get(n).needs_data])
def test_data_dependent_criterion_without_data(make, name):
    with pytest.raises(ConfigError, match=f"criterion '{name}' scores weights on data"):
        prune(make("cnn"), name, 0.5)


@pytest.mark.parametrize("name", ["synflow", "rd"])
def test_data_free_criterion_needs_an_input_shape(make, name):
    with pytest.raises(ConfigError, match="input_shape"):
        prune(make("cnn"), name, 0.5)
    mask = prune(
        make("cnn"),
        name,
        0.5,
        input_shape=(1, 8, 8),
        iterations=2,
        **({"grid": 4, "calib_samples": 8} if name == "rd" else {}),
    )
    assert mask.num_kept() == mask.numel() - mask.numel() // 2


def test_option_type_and_range_are_validated(make):
    m = make("cnn")
    with pytest.raises(ConfigError, match="synflow.iterations"):
        prune(m, "synflow", 0.5, iterations=0, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="synflow.iterations"):
        prune(m, "synflow", 0.5, iterations="many", input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="allocation"):
        prune(m, "magnitude", 0.5, allocation="sideways")
    with pytest.raises(ConfigError, match="prev_mask"):
        prune(m, "magnitude", 0.5, prev_mask=3)
    wrong = {n: torch.ones(2, 2, dtype=torch.bool) for n in default_scope(m)}
    with pytest.raises(ConfigError, match="prev_mask"):
        prune(m, "magnitude", 0.5, prev_mask=wrong)
    with pytest.raises(ConfigError, match="prev_mask"):
        prune(m, "rd", 0.5, data=(torch.zeros(2, 1, 8, 8), torch.zeros(2).long()), prev_mask={})


def test_scope_default_keep_first_keep_last_and_explicit(make):
    m = make("cnn")
    names = default_scope(m)
    assert list(prune(m, "magnitude", 0.5)) == names
    assert list(prune(m, "magnitude", 0.5, keep_first=True)) == names[1:]
    assert list(prune(m, "magnitude", 0.5, keep_first=True, keep_last=True)) == names[1:-1]
    assert list(prune(m, "global_magnitude", 0.5, scope=["fc1.weight", "conv2.weight"])) == [
        "fc1.weight",
        "conv2.weight",
    ]
    with pytest.raises(ConfigError, match="scope"):
        prune(m, "magnitude", 0.5, scope=["nope.weight"])
    with pytest.raises(ConfigError, match="scope"):
        prune(m, "magnitude", 0.5, scope="fc1.weight")
    with pytest.raises(ConfigError, match="scope"):
        prune(m, "snip", 0.5, scope=["bn1.running_mean"], data=(torch.zeros(2, 1, 8, 8), torch.zeros(2).long()))


def test_data_forms_are_equivalent(make, batch):
    m = make("cnn")
    x, y = batch
    one = score(m, "snip", data=(x, y), train_mode=False)
    as_list = score(m, "snip", data=[(x, y)], train_mode=False)
    for k in one:
        assert torch.equal(one[k], as_list[k])
    # two half batches in eval mode: the mean of the two half-batch losses = the full loss
    halves = score(m, "snip", data=[(x[:24], y[:24]), (x[24:], y[24:])], train_mode=False)
    for k in one:
        torch.testing.assert_close(halves[k], one[k], rtol=1e-4, atol=1e-7)
    with pytest.raises(ConfigError, match="data"):
        prune(m, "snip", 0.5, data=x)
    with pytest.raises(ConfigError, match="data"):
        prune(m, "snip", 0.5, data=[])


def test_score_then_allocate_equals_prune(make, batch):
    m = make("cnn")
    for name in ("snip", "global_magnitude", "lamp", "synflow"):
        s = score(m, name, data=batch, iterations=1) if name == "synflow" else score(m, name, data=batch)
        opts = {"min_keep_fraction": 0.0005} if name == "global_magnitude" else {}
        kw = {"iterations": 1} if name == "synflow" else {}
        assert allocate(s, 0.8, **opts) == prune(m, name, 0.8, data=batch, **kw)
        assert all(t.device.type == "cpu" and not t.requires_grad for t in s.values())


def test_score_of_rd_explains(make, batch):
    with pytest.raises(ConfigError, match="per-weight scores"):
        score(make("cnn"), "rd", data=batch)


def test_loss_fn_is_used(make, batch):
    m = make("cnn")
    a = score(m, "snip", data=batch)
    b = score(m, "snip", data=batch, loss_fn=lambda out, y: out.pow(2).mean())
    assert any(not torch.equal(a[k], b[k]) for k in a)
