"""Spiking token-mixing block (sparse MLP along height and width)."""

from __future__ import annotations

import torch
from torch import nn

from mixersnn.layers.common import NeuronFactory, fold, unfold

__all__ = ["SpikingTokenBlock"]


class SpikingTokenBlock(nn.Module):
    """Mixes tokens along each axis, then fuses with the identity branch.

        x_h = LIF(BN_H(Conv1x1_{H->H}(x along H)))     one HxH weight shared over (c, w)
        x_w = LIF(BN_W(Conv1x1_{W->W}(x along W)))
        u   = BN_C(Conv1x1_{3C->C, no bias}(concat[x, x_h, x_w]))     real-valued

    MLP-S replaces the identity branch ``x`` by ``LIF(BN_C(x))`` (``identity_bn=True``).

    Args:
        dim: channels C.
        grid: token grid side (H = W).
        neuron: factory of the spiking nonlinearity.
        identity_bn: MLP-S identity branch.
    """

    def __init__(self, *, dim: int, grid: int, neuron: NeuronFactory, identity_bn: bool = False) -> None:
        super().__init__()
        self.proj_h = nn.Conv2d(grid, grid, 1, bias=True)
        self.bn_h = nn.BatchNorm2d(grid)
        self.lif_h = neuron()
        self.proj_w = nn.Conv2d(grid, grid, 1, bias=True)
        self.bn_w = nn.BatchNorm2d(grid)
        self.lif_w = neuron()
        self.identity_bn_on = identity_bn
        if identity_bn:
            self.identity_bn = nn.BatchNorm2d(dim)
            self.identity_lif = neuron()
        self.fuse = nn.Conv2d(3 * dim, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` spikes -> ``[T, B, C, H, W]`` real."""
        T = x.shape[0]
        xf = fold(x)  # [N, C, H, W]
        # Along H: H becomes the conv's channel axis, [N, H, C, W].
        x_h = self.bn_h(self.proj_h(xf.transpose(1, 2)))
        x_h = self.lif_h(unfold(x_h, T)).transpose(2, 3)  # back to [T, B, C, H, W]
        # Along W: W becomes the channel axis, [N, W, H, C] -> back via permute.
        x_w = self.bn_w(self.proj_w(xf.permute(0, 3, 2, 1)))
        x_w = self.lif_w(unfold(x_w, T)).permute(0, 1, 4, 3, 2)  # [T, B, C, H, W]
        if self.identity_bn_on:
            ident = self.identity_lif(unfold(self.identity_bn(xf), T))
        else:
            ident = x
        cat = torch.cat((fold(ident), fold(x_h), fold(x_w)), dim=1)
        return unfold(self.bn(self.fuse(cat)), T)
