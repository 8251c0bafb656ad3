"""Time-folding helpers and the conv + BatchNorm unit shared by the layers.

Every activation is time-first, ``[T, B, ...]``. Stateless layers (conv, linear, BN) fold T
into the batch axis, so BatchNorm statistics are taken over T*B (and spatial positions).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["NeuronFactory", "fold", "unfold", "ConvBN"]

NeuronFactory = Callable[[], nn.Module]
"""A zero-argument callable returning a multi-step neuron module ``[T, ...] -> [T, ...]``."""


def fold(x: torch.Tensor) -> torch.Tensor:
    """``[T, B, ...] -> [T*B, ...]``."""
    return x.flatten(0, 1)


def unfold(y: torch.Tensor, T: int) -> torch.Tensor:
    """``[T*B, ...] -> [T, B, ...]``."""
    return y.unflatten(0, (T, y.shape[0] // T))


class ConvBN(nn.Module):
    """Conv2d (no bias) then BatchNorm2d, applied to ``[T, B, C, H, W]`` with T folded.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel_size: conv kernel.
        stride: conv stride.
        padding: conv padding.
    """

    def __init__(self, in_ch: int, out_ch: int, *, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        return unfold(self.bn(self.conv(fold(x))), T)
