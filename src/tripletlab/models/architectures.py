"""MobileNetV2 and ResNet-18/50 in plain torch, with torchvision's module names, so their
state-dict keys are torchvision's and its checkpoints load with ``strict=True``
(Sandler et al., CVPR 2018; He et al., CVPR 2016). Weights and the embedding head live in
:mod:`tripletlab.models.backbones`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) - BatchNorm2d - ReLU6 (torchvision's ``Conv2dNormActivation``)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ residual)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expand))
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(c_in, hidden, k=1))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


_MBV2_SETTINGS = [  # expansion t, channels c, repeats n, stride s (Sandler et al. 2018, table 2)
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision's module names (``features.*``,
    ``classifier.1.*``). ``num_classes=0`` drops the classifier (a feature extractor).

    Example:
        >>> m = MobileNetV2(num_classes=0)
        >>> m.forward_features(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 1280, 2, 2])
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        c_in = 32
        self.num_features = 1280
        features: list[nn.Module] = [ConvBNAct(3, c_in, stride=2)]
        for t, c, n, s in _MBV2_SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(ConvBNAct(c_in, self.num_features, k=1))
        self.features = nn.Sequential(*features)
        self.classifier = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))
            if num_classes
            else None
        )
        _init_weights(self)

    def stages(self) -> list[nn.Module]:
        """Modules in input order, grouped at each stride-2 step (for ``freeze_stages``)."""
        f = self.features
        return [f[0:2], f[2:4], f[4:7], f[7:14], f[14:18], f[18:]]

    def blocks(self) -> list[nn.Module]:
        """Every block in input order (``features[i]``; for ``BackboneEmbedding(blocks=...)``)."""
        return list(self.features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x).mean(dim=(2, 3))
        return self.classifier(f) if self.classifier is not None else f


# ----------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (the stride sits in the 3x3 convolution)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with torchvision's module names (``conv1``, ``bn1``, ``layer1..4``, ``fc``).

    Example:
        >>> m = resnet18(num_classes=0)
        >>> m.forward_features(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 512, 2, 2])
    """

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c_in != width * block.expansion:
                down = nn.Sequential(
                    nn.Conv2d(c_in, width * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(width * block.expansion),
                )
            blocks = [block(c_in, width, stride, down)]
            c_in = width * block.expansion
            blocks += [block(c_in, width) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes) if num_classes else None
        _init_weights(self)

    def stages(self) -> list[nn.Module]:
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def blocks(self) -> list[nn.Module]:
        """The stem, then every residual block in input order (for ``blocks=...``)."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)  # not registered
        return [stem, *self.layer1, *self.layer2, *self.layer3, *self.layer4]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x).mean(dim=(2, 3))
        return self.fc(f) if self.fc is not None else f


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (torchvision names)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 v1.5 (torchvision names)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": MobileNetV2,
    "resnet18": resnet18,
    "resnet50": resnet50,
}
"""Backbone name -> factory (``num_classes=0`` gives the feature extractor)."""

#: Keys of the ImageNet classifier in a torchvision checkpoint (not used by an embedding model).
