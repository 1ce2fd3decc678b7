"""The registered architectures.

Conventions every model here follows (other parts rely on them): layers are registered in
forward order; each conv is followed by its BatchNorm (when it has one) and then its ReLU;
the classifier is the last ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsefl.errors import ConfigError
from sparsefl.kernels.pool import MaxPool2d
from sparsefl.registry import MODELS


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _need_image(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(
            "model.name", name, f"a model for flat features (mlp): this data has samples of shape {input_shape}"
        )
    return input_shape  # type: ignore[return-value]


@MODELS.register("mlp")
class MLP(nn.Module):
    """Two hidden ReLU layers of 256 x width units (width=4 gives the 1024-wide MLP)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        d = math.prod(input_shape)
        h = _w(256, width)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.fc3 = nn.Linear(h, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@MODELS.register("cnn")
class CNN(nn.Module):
    """LeNet-style: two 3x3 conv-BN-ReLU-maxpool stages (32, 64 channels), FC 128, classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c, h, w = _need_image("cnn", input_shape)
        c1, c2, f = _w(32, width), _w(64, width), _w(128, width)
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * (h // 4) * (w // 4), f)
        self.fc2 = nn.Linear(f, num_classes)
        if h < 4 or w < 4:
            raise ConfigError("model.name", "cnn", f"inputs of at least 4x4 pixels (got {h}x{w})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN (+ shortcut), ReLU. A 1x1 conv + BN shortcut
    is used when the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block (He et al. 2016): 1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU (carrying the
    stride), 1x1 conv-BN to ``expansion * width`` channels (+ shortcut), ReLU; a 1x1 conv + BN
    shortcut when the shape changes (option B)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of basic or bottleneck blocks.

    ``stem="cifar"`` (default): a 3x3 stride-1 conv and no max-pool, for small images (the
    CIFAR ResNets of the KD study); ``stem="imagenet"``: the ImageNet ResNet's 7x7 stride-2 conv
    and 3x3 stride-2 max-pool, which leaves a 32x32 input 8x8 after the stem.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        widths: list[int],
        blocks: list[int],
        name: str,
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        c, _, _ = _need_image(name, input_shape)
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(c, widths[0], 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.pool: nn.Module = MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        layers = []
        cin = widths[0]
        expansion = getattr(block, "expansion", 1)
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w * expansion
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _cifar_resnet(depth: int):  # type: ignore[no-untyped-def]
    n = (depth - 2) // 6

    def build(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
        return ResNet(input_shape, num_classes, [_w(c, width) for c in (16, 32, 64)], [n, n, n], f"resnet{depth}")

    build.__doc__ = f"CIFAR-style ResNet-{depth} (He et al.): 3 stages of {n} basic blocks, 16/32/64 channels."
    return build


for _depth in (8, 20, 32):
    MODELS.register(f"resnet{_depth}")(_cifar_resnet(_depth))


_WIDE = (64, 128, 256, 512)


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
    """ResNet-18 (4 stages of 2 basic blocks, 64-512 channels) with a 3x3 stem for small images."""
    return ResNet(input_shape, num_classes, [_w(c, width) for c in _WIDE], [2, 2, 2, 2], "resnet18")


@MODELS.register("resnet18_imagenet")
def resnet18_imagenet(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
    """ResNet-18 with the ImageNet stem (7x7 stride-2 conv, 3x3 stride-2 max-pool): the stem a
    32x32-stem network is compared against."""
    widths = [_w(c, width) for c in _WIDE]
    return ResNet(input_shape, num_classes, widths, [2, 2, 2, 2], "resnet18_imagenet", stem="imagenet")


@MODELS.register("resnet34")
def resnet34(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
    """ResNet-34 (stages of 3/4/6/3 basic blocks, 64-512 channels) with a 3x3 stem for small images."""
    return ResNet(input_shape, num_classes, [_w(c, width) for c in _WIDE], [3, 4, 6, 3], "resnet34")


@MODELS.register("resnet50")
def resnet50(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
    """ResNet-50 (stages of 3/4/6/3 bottleneck blocks, 256-2048 output channels) with a 3x3 stem
    for small images."""
    widths = [_w(c, width) for c in _WIDE]
    return ResNet(input_shape, num_classes, widths, [3, 4, 6, 3], "resnet50", block=Bottleneck)


_VGG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm; a max-pool is skipped once the feature map is 1x1, so it
    also runs on 8x8 digits; global average pool and one linear classifier."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, plan: list, width: float, name: str) -> None:
        super().__init__()
        c, h, w = _need_image(name, input_shape)
        layers: list[nn.Module] = []
        for v in plan:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            out = _w(v, width)
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _vgg(name: str):  # type: ignore[no-untyped-def]
    def build(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
        return VGG(input_shape, num_classes, _VGG[name], width, name)

    build.__doc__ = f"{name.upper()} with BatchNorm, CIFAR style (one linear classifier)."
    return build


for _name in _VGG:
    MODELS.register(_name)(_vgg(_name))
