"""Reference models with committed trained weights (see ``rankcut.tasks.fashion_mnist``)."""

from __future__ import annotations

from rankcut.models.cnn import CNN_MODELS, VGG, ResNet, ResNeXt, resnet20, resnet56, resnext, vgg

__all__ = ["CNN_MODELS", "VGG", "ResNeXt", "ResNet", "resnet20", "resnet56", "resnext", "vgg"]
