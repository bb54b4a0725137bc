"""The classifiers (torch ``nn.Module`` subclasses), built through the registry in :mod:`trainables.networks.models`.

Each exposes ``features(x)`` (the penultimate layer, for feature geometry) and ``head`` (the last
linear layer), with ``forward(x) = head(features(x))``.

``piecewise_linear`` is true when the network is piecewise linear in its input (ReLU,
max-pool, linear layers, BatchNorm in eval mode): its input Hessian then equals the
Gauss-Newton product exactly, which the Hessian code exploits.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearModel(nn.Module):
    """Multinomial logistic regression on the flattened image."""

    piecewise_linear = True

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = in_shape
        self.head = nn.Linear(c * h * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened input: a linear model's only representation."""
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """Three 3x3 convolutions with two 2x2 max-pools and a 128-unit hidden layer; no BatchNorm.

    Sized for 8x8 (digits) and 28x28 (MNIST) inputs; any H, W divisible by 4 works.
    """

    piecewise_linear = True

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 32):
        super().__init__()
        c, h, w = in_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (h // 4) * (w // 4), 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 128-d post-ReLU hidden layer."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, identity mappings)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreResNet(nn.Module):
    """Pre-activation ResNet of depth 6n+2 with widths 16/32/64 (preresnet110: n = 18)."""

    piecewise_linear = True  # in eval mode: BN is then affine

    def __init__(self, depth: int, in_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth={depth} is invalid: must be 6n+2 >= 8")
        n = (depth - 2) // 6
        self.stem = nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)
        blocks, cin = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(PreActBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(64)
        self.head = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled 64-d features after the final BN-ReLU."""
        out = torch.relu(self.bn(self.blocks(self.stem(x))))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
