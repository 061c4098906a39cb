"""Network architectures (a registry) shared by teachers and input students: the same builders
make a teacher at their default width and a student narrower.

Each architecture is ``build(input_shape, num_classes, width) -> nn.Module``, an
``nn.Sequential`` whose penultimate node is ``embed`` (the pooled features the cache taps by
default) and last ``head``; each declares, once, the width a student of it gets by default
(:func:`student_width`): small enough to be worth distilling into (a few thousand parameters).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.errors import KdError
from pipeline.registry import Registry

Factory = Callable[[tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class ArchitectureNeeds:
    """What an architecture declares at registration: its students' default width."""

    student_width: int


ARCHITECTURES: Registry[Factory] = Registry("architecture", ArchitectureNeeds)


def student_width(arch: str) -> int:
    """The width a student of architecture ``arch`` is built with when none is given."""
    return ARCHITECTURES.declared(arch).student_width


# Layer tapped when the user names none: the pooled penultimate activations.
DEFAULT_LAYER = "embed"


def _head(width: int, num_classes: int) -> list[tuple[str, nn.Module]]:
    return [("embed", nn.Flatten(1)), ("head", nn.Linear(width, num_classes))]


@ARCHITECTURES.register("mlp", student_width=32)
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 256) -> nn.Module:
    """Two hidden layers on the flattened input; fits any input shape."""
    d = int(np.prod(input_shape))
    return nn.Sequential(OrderedDict([
        ("flat", nn.Flatten(1)),
        ("fc1", nn.Linear(d, hidden)), ("act1", nn.ReLU()),
        ("fc2", nn.Linear(hidden, hidden)), ("act2", nn.ReLU()),
        *_head(hidden, num_classes),
    ]))


def _as_channels(input_shape: tuple[int, ...], rank: int, name: str) -> tuple[list, int]:
    """Input adapters so that 1-D signals (L,) and grey images (H, W) get a channel axis."""
    if len(input_shape) == rank - 1:
        # (B, L) -> (B, 1, L) and (B, H, W) -> (B, 1, H, W): split axis 1 into (1, itself)
        return [("unsqueeze", nn.Unflatten(1, (1, input_shape[0])))], 1
    if len(input_shape) == rank:
        return [], input_shape[0]
    want = "(L,) or (C, L)" if rank == 2 else "(C, H, W)"
    raise KdError(f"teacher {name} needs inputs shaped {want}, not {tuple(input_shape)}; "
                  "pick another teacher (teacher=mlp fits any shape)")


@ARCHITECTURES.register("cnn1d", student_width=8)
def cnn1d(input_shape: tuple[int, ...], num_classes: int, width: int = 64) -> nn.Module:
    """A small 1-D CNN for signals shaped (L,) or (C, L)."""
    pre, c = _as_channels(input_shape, 2, "cnn1d")
    return nn.Sequential(OrderedDict([
        *pre,
        ("conv1", nn.Conv1d(c, width, 7, padding=3)), ("bn1", nn.BatchNorm1d(width)), ("act1", nn.ReLU()),
        ("conv2", nn.Conv1d(width, width, 5, padding=2)), ("bn2", nn.BatchNorm1d(width)), ("act2", nn.ReLU()),
        ("conv3", nn.Conv1d(width, 2 * width, 3, padding=1)), ("bn3", nn.BatchNorm1d(2 * width)),
        ("act3", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool1d(1)),
        *_head(2 * width, num_classes),
    ]))


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


@ARCHITECTURES.register("cnn_small", student_width=4)
def cnn_small(input_shape: tuple[int, ...], num_classes: int, width: int = 32) -> nn.Module:
    """Three conv blocks and global pooling, for small images shaped (C, H, W) or (H, W)."""
    pre, c = _as_channels(input_shape, 3, "cnn_small")
    return nn.Sequential(OrderedDict([
        *pre,
        ("block1", _conv_bn(c, width)),
        ("block2", _conv_bn(width, 2 * width)),
        ("down", nn.MaxPool2d(2, ceil_mode=True)),
        ("block3", _conv_bn(2 * width, 4 * width)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        *_head(4 * width, num_classes),
    ]))


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


@ARCHITECTURES.register("resnet_small", student_width=4)
def resnet_small(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """A CIFAR-style ResNet (3 stages of 2 residual blocks) for small images."""
    pre, c = _as_channels(input_shape, 3, "resnet_small")
    return nn.Sequential(OrderedDict([
        *pre,
        ("stem", _conv_bn(c, width)),
        ("stage1", nn.Sequential(_Residual(width, width, 1), _Residual(width, width, 1))),
        ("stage2", nn.Sequential(_Residual(width, 2 * width, 2), _Residual(2 * width, 2 * width, 1))),
        ("stage3", nn.Sequential(_Residual(2 * width, 4 * width, 2), _Residual(4 * width, 4 * width, 1))),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        *_head(4 * width, num_classes),
    ]))
