"""Our SGD equals torch.optim.SGD bit for bit (momentum, weight decay, missing gradients)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sparsefl.fl.sgd import SGD


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
        "from sparsefl.fl.sgd import SGD\n"
        "p = torch.nn.Parameter(torch.zeros(3)); o = SGD([p], lr=0.1, momentum=0.9)\n"
        "p.grad = torch.ones(3); o.step()\n"
        "assert 'torch._dynamo' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
