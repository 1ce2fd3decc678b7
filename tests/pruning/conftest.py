"""Shared fixtures of the pruning tests: small models on digits-shaped inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import sparsefl.pruning  # noqa: F401  (fills the CRITERIA registry)
from sparsefl.config import DataConfig, ModelConfig
from sparsefl.data import load_dataset
from sparsefl.models import build_model

#: Options that keep the expensive criteria quick where a test is not about their defaults.
#: Criteria registered later get {} and are tested with their own defaults.
FAST: dict[str, dict] = {
    "synflow": {"iterations": 4},
    "rd": {"grid": 8, "calib_samples": 32},
    "prospr": {"inner_steps": 2},
}


@pytest.fixture(scope="session")
def fast() -> Callable[[str], dict]:
    """``fast(name)`` -> quick options for criterion ``name``."""
    return lambda name: dict(FAST.get(name, {}))


@pytest.fixture(scope="session")
def digits():
    return load_dataset(DataConfig(name="digits"), 0)


@pytest.fixture(scope="session")
def batch(digits):
    return digits.x_train[:48].clone(), digits.y_train[:48].clone()


@pytest.fixture(scope="session")
def make() -> Callable[..., torch.nn.Module]:
    """``make(name, input_shape=(1, 8, 8), width=0.25, seed=0)``: a small registered model."""

    def build(name: str, input_shape=(1, 8, 8), width: float = 0.25, seed: int = 0):
        return build_model(ModelConfig(name=name, width=width), input_shape, 10, seed)

    return build


@pytest.fixture(autouse=True)
def _single_thread():
    """Run each pruning test with one intra-op thread, restored afterwards.

    These tests use tiny models, for which a second thread gains nothing, while on a loaded
    2-core machine OpenMP's spin-waiting makes small ops 10-100x slower with two threads.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
