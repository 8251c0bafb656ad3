"""Spiking Patch Encoding (SPE), the downsampling of stages 2-4 in the SPE variants."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mixersnn.layers.common import ConvBN, NeuronFactory, from_tokens, to_tokens

__all__ = ["SpikingPatchEncoding"]


class SpikingPatchEncoding(nn.Module):
    """Three stride-2 branches with spiking cross-connections (design doc section 4).

        a1 = CB3(2)(x); a2 = CB3(2)(x); a3 = CB3(2)(x)
        a2 = a2 + CB3(1)(LIF(a1))
        a3 = a3 + a1 + CB3(1)(LIF(a2))
        h  = concat(a1, a2, a3)            (pre-LIF values, as in the authors' code)

    The three stride-2 convs share their input, so they run as one conv with 3n output
    channels: same parameters, same default initialisation (the fan-in is unchanged), same
    per-channel BatchNorm, one kernel launch instead of three.

    Args:
        in_dim: input width C_in (spikes), the previous stage's width.
        out_dim: output width C_out (2 * C_in unless the config sets ``stage_dims``), divisible
            by 3.
        neuron: factory of the spiking nonlinearity.
        conv: the conv + BatchNorm unit, ``conv(in_ch, out_ch, kernel_size=, stride=,
            padding=)`` on ``[T, B, C, H, W]``; the MFI export passes its folded conv.
    """

    def __init__(
        self, *, in_dim: int, out_dim: int, neuron: NeuronFactory, conv: Callable[..., nn.Module] = ConvBN
    ) -> None:
        super().__init__()
        if out_dim % 3:
            raise ValueError(
                f"SPE out_dim={out_dim} must be divisible by 3 (three equal branches); "
                f"use a stage-1 width that is a multiple of 3 (or stage_dims that are, after the first)"
            )
        n = out_dim // 3
        self.n = n
        self.down = conv(in_dim, 3 * n, kernel_size=3, stride=2, padding=1)
        self.lif1 = neuron()
        self.conv12 = conv(n, n, kernel_size=3, stride=1, padding=1)
        self.lif2 = neuron()
        self.conv23 = conv(n, n, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C_in, H, W]`` spikes -> ``[T, B, C_out, ceil(H/2), ceil(W/2)]`` real."""
        a1, a2, a3 = self.down(x).split(self.n, dim=2)
        a2 = a2 + self.conv12(self.lif1(a1))
        a3 = a3 + a1 + self.conv23(self.lif2(a2))
        # Concatenated along the innermost (channel) memory axis, so h stays channels-last
        # (torch.cat on dim 2 would pick NCHW for these strides).
        return from_tokens(torch.cat((to_tokens(a1), to_tokens(a2), to_tokens(a3)), dim=-1))
