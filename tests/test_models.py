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
    if name in ("resnet18", "resnet18_imagenet", "resnet34", "resnet50", "vgg16", "vgg11") and shape == (3, 32, 32):
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


# published parameter counts of the CIFAR-stem ResNets at 10 classes (e.g. kuangliu/pytorch-cifar)
PUBLISHED = {"resnet18": 11_173_962, "resnet34": 21_282_122, "resnet50": 23_520_842}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_cifar_resnets_have_the_published_parameter_counts(name: str) -> None:
    m = build_model(ModelConfig(name=name), (3, 32, 32), 10, seed=0)
    assert sum(p.numel() for p in m.parameters()) == PUBLISHED[name]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_is_bottleneck_with_width_and_one_channel_28x28() -> None:
    m = build_model(ModelConfig(name="resnet50", width=0.25), (1, 28, 28), 10, seed=0)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.in_channels == 1
    block = m.layers[3][0]
    assert (block.conv1.kernel_size, block.conv2.kernel_size, block.conv3.kernel_size) == ((1, 1), (3, 3), (1, 1))
    assert block.conv2.stride == (2, 2) and block.conv3.out_channels == 4 * 128
    assert m.fc.in_features == 4 * 128
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_imagenet_stem_downsamples_four_times_before_the_stages() -> None:
    seen: dict[str, tuple[int, ...]] = {}
    for name in ("resnet18", "resnet18_imagenet"):
        m = build_model(ModelConfig(name=name, width=0.125), (3, 32, 32), 10, seed=0)
        m.layers.register_forward_pre_hook(lambda mod, a, name=name: seen.__setitem__(name, tuple(a[0].shape)))
        m(torch.randn(2, 3, 32, 32))
    assert seen["resnet18"][2:] == (32, 32) and seen["resnet18_imagenet"][2:] == (8, 8)
