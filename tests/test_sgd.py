"""Our SGD equals torch.optim.SGD bit for bit (momentum, weight decay, missing gradients)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sparsefl.runtime.sgd import SGD


@pytest.mark.parametrize("momentum,wd", [(0.9, 5e-4), (0.0, 0.0), (0.5, 0.0), (0.0, 1e-3)])
def test_sgd_matches_torch_bit_for_bit(momentum: float, wd: float) -> None:
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g), torch.randn(2, generator=g)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    ours = SGD(a, lr=0.05, momentum=momentum, weight_decay=wd)
    ref = torch.optim.SGD(b, lr=0.05, momentum=momentum, weight_decay=wd)
    for step in range(6):
        grads = [torch.randn(t.shape, generator=g) for t in init]
        for i, (pa, pb, gr) in enumerate(zip(a, b, grads)):
            skip = i == 2 and step in (1, 2)  # a parameter without a gradient this step
            pa.grad = None if skip else gr.clone()
            pb.grad = None if skip else gr.clone()
        ours.step()
        ref.step()
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb)
        ours.zero_grad()
        ref.zero_grad()
        assert all(p.grad is None for p in a)


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(ValueError, match="momentum"):
        SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=1.0)


def test_training_a_client_does_not_import_the_compiler() -> None:
    code = (
        "import sys, torch\n"
        "from sparsefl.runtime.sgd import SGD\n"
        "p = torch.nn.Parameter(torch.zeros(3)); o = SGD([p], lr=0.1, momentum=0.9)\n"
        "p.grad = torch.ones(3); o.step()\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("momentum,wd", [(0.9, 5e-4), (0.0, 1e-3)])
def test_row_restricted_step_updates_only_those_rows(momentum: float, wd: float) -> None:
    """``step(rows)``: the listed rows follow plain SGD (with full steps before, as FedSkel's
    SetSkel steps are); every other row, and its momentum, is never written."""
    g = torch.Generator().manual_seed(3)
    init = torch.randn(64, 3, 3, 3, generator=g)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours, ref = (
        SGD([a], lr=0.05, momentum=momentum, weight_decay=wd),
        SGD([b], lr=0.05, momentum=momentum, weight_decay=wd),
    )
    rows = torch.tensor([1, 5, 6, 40, 63])
    frozen = torch.ones(64, dtype=torch.bool)
    frozen[rows] = False
    for step in range(6):
        grad = torch.randn(init.shape, generator=g)
        grad[frozen] = 0  # what the skeleton backward gives
        a.grad, b.grad = grad.clone(), grad.clone()
        restricted = step >= 2
        before = a.detach().clone()
        ours.step({a: rows} if restricted else None)
        ref.step()
        assert torch.equal(a[rows], b[rows])  # the same element-wise operations: the same bits
        if restricted:
            assert torch.equal(a[frozen], before[frozen])
        else:
            assert torch.equal(a, b)


def test_row_restricted_first_step_follows_the_first_step_rule() -> None:
    """With momentum, a first step restricted to some rows sets their buffer to the gradient
    (torch's rule), exactly as an unrestricted first step does for those rows."""
    g = torch.Generator().manual_seed(4)
    init = torch.randn(8, 4, generator=g)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ours, ref = SGD([a], lr=0.1, momentum=0.9), torch.optim.SGD([b], lr=0.1, momentum=0.9)
    rows = torch.tensor([0, 3])
    for _ in range(3):
        grad = torch.randn(init.shape, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step({a: rows})
        ref.step()
        assert torch.equal(a[rows], b[rows])
    assert torch.equal(a[[1, 2, 4, 5, 6, 7]], init[[1, 2, 4, 5, 6, 7]])


def test_row_gradients_given_compact_equal_the_full_gradient_path() -> None:
    """``step(rows, row_grads)``: a gradient given for the rows alone (p.grad None) updates
    exactly as the full gradient that is zero elsewhere; with p.grad set too, both add."""
    g = torch.Generator().manual_seed(5)
    init = torch.randn(16, 3, 3, generator=g)
    rows = torch.tensor([2, 3, 11])
    a, b, c, d = (torch.nn.Parameter(init.clone()) for _ in range(4))
    opts = [SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3) for p in (a, b, c, d)]
    for _ in range(4):
        part = torch.randn(len(rows), 3, 3, generator=g)
        extra = torch.randn(init.shape, generator=g)
        full = torch.zeros(init.shape).index_copy_(0, rows, part)
        a.grad, b.grad = None, full
        opts[0].step({a: rows}, {a: part})
        opts[1].step({b: rows})
        assert torch.equal(a, b)
        c.grad, d.grad = extra.clone(), extra + full  # both: the rows get extra[rows] + part
        opts[2].step({c: rows}, {c: part})
        opts[3].step({d: rows})
        assert torch.equal(c, d)
    with pytest.raises(ValueError, match="without rows"):
        SGD([a], lr=0.1).step(None, {a: part})
