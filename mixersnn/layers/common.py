"""Time-folding helpers and the conv + BatchNorm unit shared by the layers.

Every activation is time-first, ``[T, B, ...]``. Stateless layers (conv, linear, BN) fold T
into the batch axis, so BatchNorm statistics are taken over T*B (and spatial positions).

Memory layout: the shapes are ``[T, B, C, H, W]`` everywhere, but the layers keep the memory
channels-last, ``[T, B, H, W, C]`` (:func:`to_tokens` is then a free view). The channel MLP
and the token block's fusing conv are matmuls over C, which want C innermost; in NCHW every
block paid transposing copies in and out, and the 1x1 convs ran slower than the same matmul
(docs/benchmarks.md, "Training step"). Any layout is accepted; this one is what they produce.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixersnn.kernels.spike_linear import spike_linear

__all__ = ["NeuronFactory", "fold", "unfold", "to_tokens", "from_tokens", "ConvBN", "PointwiseConv2d"]

NeuronFactory = Callable[[], nn.Module]
"""A zero-argument callable returning a multi-step neuron module ``[T, ...] -> [T, ...]``."""


def fold(x: torch.Tensor) -> torch.Tensor:
    """``[T, B, ...] -> [T*B, ...]``."""
    return x.flatten(0, 1)


def unfold(y: torch.Tensor, T: int) -> torch.Tensor:
    """``[T*B, ...] -> [T, B, ...]``."""
    return y.unflatten(0, (T, y.shape[0] // T))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[T, B, C, H, W] -> [T, B, H, W, C]``, a view (contiguous for channels-last memory)."""
    return x.permute(0, 1, 3, 4, 2)


def from_tokens(t: torch.Tensor) -> torch.Tensor:
    """``[T, B, H, W, C] -> [T, B, C, H, W]``, a view with channels-last memory."""
    return t.permute(0, 1, 4, 2, 3)


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
        # The weight lives channels-last like the activations: oneDNN would otherwise reorder
        # it on every call, forward and backward (13 ms of a 400 ms MLP-SPE-T step at 32 px).
        # Same values, same state-dict entry; loading copies into these strides.
        self.conv.weight.data = self.conv.weight.data.contiguous(memory_format=torch.channels_last)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        # Channels-last in, channels-last out (oneDNN keeps the input's memory format).
        y = fold(x).contiguous(memory_format=torch.channels_last)
        return unfold(self.bn(self.conv(y)), T)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` computed as a matmul, in the input's memory layout.

    Same parameters, initialisation, state-dict keys and hooks as ``nn.Conv2d(in_ch, out_ch,
    1)`` (it is one, so accounting and MFI export treat it as before); only the arithmetic
    moves from oneDNN's convolution, which is slow for these shapes on CPUs (a few channels
    over a long spatial axis, or a 1x1 grid), to a GEMM:

    - channels-last input (C innermost): ``linear`` over C, output channels-last; computed
      from the input's nonzeros on the CPU while ``event_driven`` is True (the default, see
      :func:`mixersnn.kernels.spike_linear.spike_linear`);
    - otherwise: ``W @ x.view(N, C, H*W)`` per sample (``bmm``), output contiguous NCHW.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        bias: learnable bias.
    """

    event_driven: bool = True

    def __init__(self, in_ch: int, out_ch: int, *, bias: bool = True) -> None:
        super().__init__(in_ch, out_ch, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C_in, H, W] -> [N, C_out, H, W]``."""
        w = self.weight.view(self.out_channels, self.in_channels)
        if x.dim() != 4:
            return super().forward(x)
        N, _, H, W = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not (x.is_contiguous() and H * W > 1):
            linear = spike_linear if self.event_driven else F.linear
            return linear(x.permute(0, 2, 3, 1), w, self.bias).permute(0, 3, 1, 2)
        # One small [C_out, C_in] @ [C_in, H*W] per sample: bmm over the expanded weight (a
        # view) is 3-5x faster than torch.matmul, which transposes x into one tall mm.
        xs = x.reshape(N, self.in_channels, H * W)
        ws = w.expand(N, -1, -1)
        y = torch.bmm(ws, xs) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(-1), ws, xs)
        return y.view(N, self.out_channels, H, W)
