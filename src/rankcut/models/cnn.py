"""Reference CNNs for 1×28×28 grayscale images and 10 classes, in plain PyTorch.

They cover the layer shapes rankcut factorizes: ordinary and grouped 3×3 convolutions, 1×1 convolutions and
large fully connected layers. Each is small enough (≤ 1 M parameters) to train on a CPU in minutes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NUM_CLASSES = 10
IN_CHANNELS = 1


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """A bias-free convolution ("same" padding) followed by batch normalisation."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1×1 convolution + BN projection where the shape changes (option B of He et al.)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return _conv_bn(in_channels, out_channels, 1, stride)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_channels, out_channels, 3, stride)
        self.conv2 = _conv_bn(out_channels, out_channels, 3)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(out) + self.shortcut(x))


class BottleneckBlock(nn.Module):
    """ResNeXt block: 1×1 reduce, grouped 3×3 (``cardinality`` groups), 1×1 expand, residual connection."""

    def __init__(self, in_channels: int, width: int, out_channels: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        self.reduce = _conv_bn(in_channels, width, 1)
        self.grouped = _conv_bn(width, width, 3, stride, groups=cardinality)
        self.expand = _conv_bn(width, out_channels, 1)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.reduce(x))
        out = torch.relu(self.grouped(out))
        return torch.relu(self.expand(out) + self.shortcut(x))


class _StagedNet(nn.Module):
    """A stem conv, a sequence of residual blocks, global average pooling and a linear classifier."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(out), 1))


class ResNet(_StagedNet):
    """CIFAR-style ResNet (He et al. 2016): a 3×3 stem, three stages of 16/32/64 channels, global pooling.

    Each stage has ``blocks_per_stage`` basic blocks; depth is ``6 * blocks_per_stage + 2``.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS) -> None:
        blocks: list[nn.Module] = []
        channels = 16
        for stage, out_channels in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        super().__init__(_conv_bn(in_channels, 16, 3), blocks, channels, num_classes)


class ResNeXt(_StagedNet):
    """Small ResNeXt (Xie et al. 2017): three stages of bottleneck blocks with grouped 3×3 convolutions.

    Stage outputs are 64/128/256 channels with bottleneck widths 32/64/128, i.e. ``cardinality`` groups of
    4/8/16 channels each. Every stage halves the resolution (28 → 14 → 7 → 4): grouped convolutions are slow
    on CPUs, and at full resolution they would make training several times slower.
    """

    def __init__(
        self,
        blocks_per_stage: int = 2,
        cardinality: int = 8,
        num_classes: int = NUM_CLASSES,
        in_channels: int = IN_CHANNELS,
    ) -> None:
        blocks: list[nn.Module] = []
        channels = 32
        for width, out_channels in ((32, 64), (64, 128), (128, 256)):
            for block in range(blocks_per_stage):
                stride = 2 if block == 0 else 1
                blocks.append(BottleneckBlock(channels, width, out_channels, cardinality, stride))
                channels = out_channels
        super().__init__(_conv_bn(in_channels, 32, 3), blocks, channels, num_classes)


class VGG(nn.Module):
    """VGG-style net: three stages of two 3×3 conv + BN + ReLU and a 2×2 max pool (28 → 14 → 7 → 3), then a
    large fully connected classifier, so that most parameters sit in linear layers.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = IN_CHANNELS, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in (32, 64, 128):
            for _ in range(2):
                layers += [_conv_bn(channels, out_channels, 3), nn.ReLU(inplace=True)]
                channels = out_channels
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels * 3 * 3, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def resnet20() -> ResNet:
    """ResNet-20: three basic blocks per stage."""
    return ResNet(3)


def resnet56() -> ResNet:
    """ResNet-56: nine basic blocks per stage."""
    return ResNet(9)


def resnext() -> ResNeXt:
    """Small ResNeXt: two bottleneck blocks per stage, cardinality 8."""
    return ResNeXt()


def vgg() -> VGG:
    """VGG-style net with a 1152 → 512 → 512 → 10 classifier."""
    return VGG()


CNN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnext": resnext,
    "vgg": vgg,
}
