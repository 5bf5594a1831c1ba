"""The tutorial's models, built here so demos, tests and benchmarks need no downloads.

``Net`` is the small CNN of the PyTorch tutorial (conv-pool-conv-pool-three linear layers, for
3x32x32 images). ``VGG`` is a VGG-style network (stacks of 3x3 convolutions and max-pools, then
a classifier); ``vgg16()`` has the layer sizes of torchvision's VGG-16 without downloading it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model.capture import Keepable

VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class Net(nn.Module):
    """The tutorial's CNN for 3x32x32 inputs and 10 classes; optional dropout for training."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        out: torch.Tensor = self.fc3(x)
        return out


class VGG(Keepable, nn.Module):
    """A VGG-style network: ``layers`` lists conv widths, with ``"M"`` for a 2x2 max-pool.

    It records its constructor arguments (:class:`~torchkeep.Keepable`), so a bundle of any
    configuration rebuilds itself.
    """

    def __init__(
        self,
        layers: Sequence[int | str] = VGG16_LAYERS,
        num_classes: int = 1000,
        image_size: int = 224,
        hidden: int = 4096,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 3
        size = image_size
        for layer in layers:
            if layer == "M":
                blocks.append(nn.MaxPool2d(2, 2))
                size //= 2
                continue
            assert isinstance(layer, int)
            blocks.append(nn.Conv2d(channels, layer, 3, padding=1))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(layer))
            blocks.append(nn.ReLU(inplace=True))
            channels = layer
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.features(x))
        return out


def vgg16(num_classes: int = 1000) -> VGG:
    """A VGG-16-sized network (~138M parameters, ~528 MiB in float32)."""
    return VGG(VGG16_LAYERS, num_classes=num_classes)


def small_vgg(num_classes: int = 10, batch_norm: bool = False) -> VGG:
    """A small VGG-style network for 3x32x32 inputs, quick enough for tests and demos."""
    return VGG((16, "M", 32, "M", 64, "M"), num_classes, 32, hidden=64, batch_norm=batch_norm)
