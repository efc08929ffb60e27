"""Model zoo: small, well-known CNNs and a compact ViT, defined here (no torchvision)."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from qtool.errors import QtoolError
from qtool.models.digitnet import DigitNet
from qtool.models.lenet import LeNet5
from qtool.models.mobilenetv2 import MobileNetV2Cifar
from qtool.models.resnet_cifar import ResNetCifar
from qtool.models.resnet_imagenet import ResNet18
from qtool.models.vgg import VGGSmall
from qtool.models.vit_cifar import ViTCifar

_ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda **kw: ResNetCifar(depth=20, **kw),
    "resnet32": lambda **kw: ResNetCifar(depth=32, **kw),
    "resnet44": lambda **kw: ResNetCifar(depth=44, **kw),
    "resnet56": lambda **kw: ResNetCifar(depth=56, **kw),
    "mobilenetv2": MobileNetV2Cifar,
    # width 0.5 (timm's name): 0.70M parameters, 25M MACs at 32x32, a third of the full width's training time
    "mobilenetv2_050": lambda **kw: MobileNetV2Cifar(width=0.5, **kw),
    # conv-tokenizer ViT (dim 128, 4 pre-norm blocks, 64 tokens): 0.58M parameters
    "vit_cifar": lambda **kw: ViTCifar(depth=4, **kw),
    "lenet5": LeNet5,
    "digitnet": DigitNet,
    "vgg_small": VGGSmall,
    "resnet18": ResNet18,
}


def model_names() -> list[str]:
    return sorted(_ZOO)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    try:
        factory = _ZOO[name]
    except KeyError:
        raise QtoolError(f"unknown model {name!r}; choose from {', '.join(model_names())}") from None
    return factory(num_classes=num_classes, in_channels=in_channels)
