"""Stage-1 patch embedding and the MLP-S (no-SPE) downsampling."""

from __future__ import annotations

import torch
from torch import nn

from mixersnn.layers.common import ConvBN

__all__ = ["PatchEmbed", "ConvDownsample"]


class PatchEmbed(nn.Module):
    """Conv2d(in_chans -> C, kernel = stride = patch, no bias) + BatchNorm2d.

    The only layer that sees real-valued pixels. Its input (the image, direct encoding) is the
    same at every time step, so it runs once on ``[B, ...]`` and the result is broadcast over
    T as a view: T times less compute and memory than the reference, with identical outputs.
    (BatchNorm over T identical copies has the same batch mean and biased variance; only the
    unbiased correction of ``running_var``, n/(n-1), uses n = B*H*W instead of T*B*H*W.)

    Args:
        in_chans: image channels.
        dim: output width C.
        patch_size: patch side.
    """

    def __init__(self, *, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, img: torch.Tensor, T: int) -> torch.Tensor:
        """``[B, C_in, H, W]`` image -> ``[T, B, C, H/p, W/p]`` (a broadcast view, channels-last
        memory like every activation, see ``mixersnn.layers.common``)."""
        y = self.bn(self.conv(img.contiguous(memory_format=torch.channels_last)))
        return y.unsqueeze(0).expand(T, *y.shape)


class ConvDownsample(ConvBN):
    """MLP-S downsampling: Conv2d(C/2 -> C, kernel 2, stride 2, no bias) + BatchNorm2d.

    Odd grids (28-px inputs) are padded by one so the output is ceil(H/2), like SPE's
    3x3/stride-2 convs; even grids (every configuration of the paper) are unpadded.

    Args:
        in_dim: input width, the previous stage's (C/2 unless the config sets ``stage_dims``).
        out_dim: output width C.
        grid: input grid side H.
    """

    def __init__(self, *, in_dim: int, out_dim: int, grid: int) -> None:
        super().__init__(in_dim, out_dim, kernel_size=2, stride=2, padding=grid % 2)
