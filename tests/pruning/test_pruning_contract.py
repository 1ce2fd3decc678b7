"""Contract tests run over every registered criterion (new ones are picked up automatically):
purity, determinism, exact sparsity, mask shape and keys."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefl.errors import ConfigError
from sparsefl.masks import default_scope
from sparsefl.pruning import prune, score
from sparsefl.registry import CRITERIA

NAMES = CRITERIA.names()


def _hooks(model: torch.nn.Module) -> dict:
    out = {}
    for name, m in model.named_modules():
        out[name] = tuple(
            tuple(getattr(m, attr).keys())
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
                "_load_state_dict_pre_hooks",
            )
        )
    return out


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ptr": {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()},
        "dtype": {k: v.dtype for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "hooks": _hooks(model),
        "params": [id(p) for p in model.parameters()],
    }


def _assert_same(before: dict, model: torch.nn.Module) -> None:
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        a, b = before["state"][k], after["state"][k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a, b), f"{k} changed"
    for key in ("ptr", "dtype", "training", "requires_grad", "hooks", "params"):
        assert before[key] == after[key], key
    for n, g in before["grad"].items():
        h = after["grad"][n]
        assert (g is None) == (h is None), n
        if g is not None:
            assert torch.equal(g, h), n


def _user_model(make, arch: str, batch) -> torch.nn.Module:
    """A model in a state a user might hand over: training mode with one submodule in eval, a
    frozen tensor, stale gradients, and a forward hook of their own."""
    model = make(arch)
    model.train()
    x, y = batch
    torch.nn.functional.cross_entropy(model(x), y).backward()  # fills .grad, moves BN stats
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn.eval()
    next(iter(model.parameters())).requires_grad_(False)
    model.register_forward_hook(lambda _m, _i, _o: None)
    return model


@pytest.mark.parametrize("arch", ["cnn", "resnet8"])
@pytest.mark.parametrize("name", NAMES)
def test_criterion_is_pure(name, arch, make, batch, fast):
    model = _user_model(make, arch, batch)
    before = _snapshot(model)
    rng_before = torch.random.get_rng_state()
    prune(model, name, 0.8, data=batch, seed=3, **fast(name))
    _assert_same(before, model)
    if CRITERIA.get(name).has_scores:
        score(model, name, data=batch, seed=3, **fast(name))
        _assert_same(before, model)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "global RNG state moved"


@pytest.mark.parametrize("name", NAMES)
def test_criterion_is_deterministic(name, make, batch, fast):
    model = make("cnn")
    m1 = prune(model, name, 0.7, data=batch, seed=5, **fast(name))
    m2 = prune(make("cnn"), name, 0.7, data=batch, seed=5, **fast(name))
    assert m1 == m2
    if CRITERIA.get(name).has_scores:
        s1 = score(model, name, data=batch, seed=5, **fast(name))
        s2 = score(model, name, data=batch, seed=5, **fast(name))
        assert s1.keys() == s2.keys()
        for k in s1:
            assert torch.equal(s1[k], s2[k]), k
            assert s1[k].shape == model.state_dict()[k].shape


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.93])
@pytest.mark.parametrize("name", NAMES)
def test_exact_sparsity(name, sparsity, make, batch, fast):
    model = make("resnet8", width=0.5)
    cls = CRITERIA.get(name)
    mask = prune(model, name, sparsity, data=batch, **fast(name))
    scope = default_scope(model)
    state = model.state_dict()
    assert list(mask) == scope
    for n in scope:
        assert mask[n].dtype == torch.bool and mask[n].shape == state[n].shape
        assert bool(mask[n].any()), f"{name} emptied {n}"
    total = mask.numel()
    target_kept = total - math.floor(sparsity * total + 1e-6)
    if cls.structured:
        rows = max(math.prod(state[n].shape[1:]) for n in scope)
        assert abs(mask.num_kept() - target_kept) <= rows
        for n in scope:
            m = mask[n].reshape(mask[n].shape[0], -1)
            assert bool((m.all(1) | ~m.any(1)).all()), "rows must be whole"
    elif cls.per_layer:
        for n in scope:
            t = mask[n].numel() - math.floor(sparsity * mask[n].numel() + 1e-6)
            assert abs(int(mask[n].sum()) - t) <= 1, n
    else:
        assert abs(mask.num_kept() - target_kept) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_rejected(name, make, batch):
    with pytest.raises(ConfigError, match="no_such_option"):
        prune(make("mlp", input_shape=(64,)), name, 0.5, data=batch, no_such_option=1)
