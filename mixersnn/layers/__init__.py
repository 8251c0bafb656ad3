"""Mixer-SNN building blocks, all time-first ``[T, B, ...]``."""

from __future__ import annotations

from mixersnn.layers.channel_block import SpikingChannelBlock
from mixersnn.layers.common import ConvBN, NeuronFactory, PointwiseConv2d, fold, from_tokens, to_tokens, unfold
from mixersnn.layers.head import ClassifierHead
from mixersnn.layers.patch_embed import ConvDownsample, PatchEmbed
from mixersnn.layers.spiking_patch_encoding import SpikingPatchEncoding
from mixersnn.layers.token_block import SpikingTokenBlock

__all__ = [
    "ClassifierHead",
    "ConvBN",
    "ConvDownsample",
    "NeuronFactory",
    "PatchEmbed",
    "PointwiseConv2d",
    "SpikingChannelBlock",
    "SpikingPatchEncoding",
    "SpikingTokenBlock",
    "fold",
    "from_tokens",
    "to_tokens",
    "unfold",
]
