from __future__ import annotations

import pytest
import torch

from sparsefl.config import ModelConfig
from sparsefl.errors import ConfigError
from sparsefl.masks import default_scope
from sparsefl.models import build_model
from sparsefl.registry import MODELS
from sparsefl.state import state_sha256


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_every_model_builds_and_runs(name, shape):
    if name in ("resnet18", "vgg16", "vgg11") and shape == (3, 32, 32):
        pytest.skip("large model at 32x32 is covered by the FLOP tests")
    m = build_model(ModelConfig(name=name), shape, 7, seed=0)
    out = m(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert default_scope(m)[-1].endswith("weight")


@pytest.mark.parametrize("name", MODELS.names())
def test_initialisation_is_seeded_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model(ModelConfig(name=name), (1, 8, 8), 10, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model(ModelConfig(name=name), (1, 8, 8), 10, seed=5)
    c = build_model(ModelConfig(name=name), (1, 8, 8), 10, seed=6)
    assert state_sha256(a.state_dict()) == state_sha256(b.state_dict())
    assert state_sha256(a.state_dict()) != state_sha256(c.state_dict())


def test_width_scales_channels():
    small = build_model(ModelConfig(name="mlp", width=1.0), (64,), 10, 0)
    wide = build_model(ModelConfig(name="mlp", width=4.0), (64,), 10, 0)
    assert small.fc1.out_features == 256 and wide.fc1.out_features == 1024


def test_image_models_refuse_flat_features_with_a_clear_error():
    with pytest.raises(ConfigError, match="mlp"):
        build_model(ModelConfig(name="cnn"), (64,), 10, 0)
