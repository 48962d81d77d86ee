"""The networks of the MAML / iMAML experiments.

Batch-norm layers keep no running statistics (``track_running_stats=False``):
they normalise with the statistics of the batch they see, in training and in
evaluation mode alike, as in MAML and iMAML.  The models hold no buffers, so
``torch.func.functional_call`` with a dict of (stacked) parameters is all that
is needed to run them with other weights, also under ``torch.func.vmap``.
Parameters use PyTorch's default initialisation.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

__all__ = ["OmniglotConvNet", "Conv4", "MiniImagenetConvNet", "SinusoidMLP"]


def _check_images(x: torch.Tensor, expected: Tuple[int, int, int], model: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        c, h, w = expected
        raise ValueError(f"{model} takes images [B, {c}, {h}, {w}], got {tuple(x.shape)}; "
                         f"flatten the task dimension first, or use torch.func.vmap over it")


def _conv_block(in_channels: int, out_channels: int, stride: int, pool: bool) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class OmniglotConvNet(nn.Module):
    """iMAML's Omniglot network: [B, C_in, 28, 28] → logits [B, ways].

    4 × [conv 3×3, ``hidden`` filters, stride 2, padding 1 → batch norm → ReLU]
    (28 → 14 → 7 → 4 → 2), flatten (hidden·2·2), linear to ``ways``.
    113,221 parameters for 5-way with the defaults.
    """

    def __init__(self, ways: int = 5, in_channels: int = 1, hidden: int = 64):
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(*(
            _conv_block(in_channels if i == 0 else hidden, hidden, stride=2, pool=False)
            for i in range(4)))
        self.classifier = nn.Linear(hidden * 2 * 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, (self.in_channels, 28, 28), type(self).__name__)
        return self.classifier(self.features(x).flatten(1))


class Conv4(nn.Module):
    """The max-pool Conv-4 of MAML, iMAML and learn2learn:
    [B, C_in, S, S] → logits [B, ways].

    4 × [conv 3×3, ``hidden`` filters, padding 1 → batch norm → ReLU → max-pool 2]
    (each pooling floors: 28 → 14 → 7 → 3 → 1, 84 → 42 → 21 → 10 → 5),
    flatten (hidden·s·s, s the last side), linear to ``ways``.
    ``Conv4(ways, 1, 28)``: Omniglot size, 112,261 parameters for 5-way;
    ``Conv4(ways, 3, 84)``: MiniImageNet size, 121,093 for 5-way.
    """

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64):
        super().__init__()
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"Conv4 halves the image 4 times; image_size must be at least 16, got {image_size}")
        self.input_shape = (in_channels, image_size, image_size)
        self.features = nn.Sequential(*(
            _conv_block(in_channels if i == 0 else hidden, hidden, stride=1, pool=True) for i in range(4)))
        self.classifier = nn.Linear(hidden * side * side, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.input_shape, type(self).__name__)
        return self.classifier(self.features(x).flatten(1))


class MiniImagenetConvNet(Conv4):
    """The 4-block MiniImageNet network of the iMAML paper: [B, 3, 84, 84] → logits [B, ways];
    :class:`Conv4` with 32 filters (hidden·5·5 features)."""

    def __init__(self, ways: int = 5, hidden: int = 32):
        super().__init__(ways=ways, in_channels=3, image_size=84, hidden=hidden)


class SinusoidMLP(nn.Module):
    """The sinusoid regression network: x [B, 1] → y [B, 1]; 1-40-40-1 with ReLU."""

    def __init__(self, hidden: int = 40):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != 1:
            raise ValueError(f"SinusoidMLP takes x [B, 1], got {tuple(x.shape)}")
        return self.net(x)
