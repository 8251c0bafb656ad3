"""Spiking token-mixing block (sparse MLP along height and width)."""

from __future__ import annotations

import torch
from torch import nn

from mixersnn.layers.common import NeuronFactory, PointwiseConv2d, fold, from_tokens, to_tokens, unfold

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
        self.proj_h = PointwiseConv2d(grid, grid, bias=True)
        self.bn_h = nn.BatchNorm2d(grid)
        self.lif_h = neuron()
        self.proj_w = PointwiseConv2d(grid, grid, bias=True)
        self.bn_w = nn.BatchNorm2d(grid)
        self.lif_w = neuron()
        self.identity_bn_on = identity_bn
        if identity_bn:
            self.identity_bn = nn.BatchNorm2d(dim)
            self.identity_lif = neuron()
        self.fuse = PointwiseConv2d(3 * dim, dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` spikes -> ``[T, B, C, H, W]`` real (channels-last memory)."""
        T, B, C, H, W = x.shape
        xt = to_tokens(x).reshape(T * B, H, W, C)  # a view for channels-last x
        # Along H: H is the conv's channel axis of [T*B, H, W, C] (contiguous, no transpose);
        # BN_H's statistics are over (T*B, W, C), as over (T*B, C, W) in NCHW.
        # The neurons see the shapes they saw in NCHW ([T, B, H, C, W] and [T, B, W, H, C]: the
        # mixed axis where the conv's channels were), as permuted views, so spike hooks and
        # MFI comparisons line up; the memory stays [T, B, H, W, C].
        x_h = self.bn_h(self.proj_h(xt)).view(T, B, H, W, C)
        x_h = self.lif_h(x_h.transpose(3, 4)).transpose(3, 4)
        # Along W: [T*B*H, W, C, 1] puts W on the channel axis, again a view.
        x_w = self.bn_w(self.proj_w(xt.reshape(T * B * H, W, C, 1))).view(T, B, H, W, C)
        x_w = self.lif_w(x_w.transpose(2, 3)).transpose(2, 3)
        if self.identity_bn_on:
            ident = to_tokens(self.identity_lif(unfold(self.identity_bn(fold(x)), T)))
        else:
            ident = to_tokens(x)
        cat = torch.cat((ident, x_h, x_w), dim=-1)  # [T, B, H, W, 3C]
        # The fusing 1x1 conv on a channels-last view: a matmul over 3C.
        return unfold(self.bn(self.fuse(fold(from_tokens(cat)))), T)
