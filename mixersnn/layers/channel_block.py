"""Spiking channel-mixing MLP with BatchNorm over token positions."""

from __future__ import annotations

import torch
from torch import nn

from mixersnn.kernels.spike_linear import SpikeLinear
from mixersnn.layers.common import NeuronFactory, fold, from_tokens, to_tokens, unfold

__all__ = ["SpikingChannelBlock"]


class SpikingChannelBlock(nn.Module):
    """Linear(C -> aC) + BN1d(N) + LIF + Linear(aC -> C) + BN1d(N), on tokens ``[T, B, N, C]``.

    The BatchNorm1d layers normalise over the N token positions (one scale/bias per position,
    statistics over T*B and channels), as in the authors' code; this and the token-mixing
    weights tie a model to one input resolution.

    Args:
        dim: channels C.
        hidden: hidden width a*C.
        num_tokens: N = H*W.
        neuron: factory of the spiking nonlinearity.
    """

    def __init__(self, *, dim: int, hidden: int, num_tokens: int, neuron: NeuronFactory) -> None:
        super().__init__()
        self.fc1 = SpikeLinear(dim, hidden)  # both read spikes: event-driven on the CPU
        self.bn1 = nn.BatchNorm1d(num_tokens)
        self.lif = neuron()
        self.fc2 = SpikeLinear(hidden, dim)
        self.bn2 = nn.BatchNorm1d(num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` spikes -> ``[T, B, C, H, W]`` real."""
        T, B, C, H, W = x.shape
        tok = to_tokens(x).reshape(T * B, H * W, C)  # a view for channels-last x
        y = self.lif(unfold(self.bn1(self.fc1(tok)), T))
        y = self.bn2(self.fc2(fold(y)))  # [T*B, N, C]
        return from_tokens(y.view(T, B, H, W, C))  # channels-last, no copy
