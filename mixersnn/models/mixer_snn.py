"""The Mixer-SNN network: stages of spiking token/channel blocks (design doc section 4)."""

from __future__ import annotations

import functools
from typing import Optional, Type

import torch
from torch import nn

from mixersnn.layers import (
    ClassifierHead,
    ConvDownsample,
    NeuronFactory,
    PatchEmbed,
    SpikingChannelBlock,
    SpikingPatchEncoding,
    SpikingTokenBlock,
)
from mixersnn.models.config import MixerSNNConfig
from mixersnn.neurons import LIF

__all__ = ["MixerSNN", "MixerBlock", "Stage"]


class MixerBlock(nn.Module):
    """One block; blocks chain only through spikes and re-use the stage input ``h``.

        u = TokenBlock(x);  x = LIF(h + u);  x = LIF(h + u + ChannelBlock(x))
    """

    def __init__(self, *, token: nn.Module, channel: nn.Module, neuron: NeuronFactory) -> None:
        super().__init__()
        self.token = token
        self.lif_token = neuron()
        self.channel = channel
        self.lif_channel = neuron()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        u = h + self.token(x)
        x = self.lif_token(u)
        return self.lif_channel(u + self.channel(x))


class Stage(nn.Module):
    """``h = Embed(x_in); x = LIF(h); x = block(x, h) for each block``."""

    def __init__(self, *, embed: nn.Module, blocks: list[MixerBlock], neuron: NeuronFactory) -> None:
        super().__init__()
        self.embed = embed
        self.lif = neuron()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x_in: torch.Tensor, T: Optional[int] = None) -> torch.Tensor:
        h = self.embed(x_in) if T is None else self.embed(x_in, T)
        x = self.lif(h)
        for blk in self.blocks:
            x = blk(x, h)
        return x


class MixerSNN(nn.Module):
    """Mixer-SNN: images ``[B, C, H, W]`` -> per-step logits ``[T, B, K]``.

    The input is encoded directly (the normalised image at every step). Every membrane starts
    at 0 on each call, so no state survives between batches. Loss and accuracy should use the
    mean over T (``logits.mean(0)``).

    Args:
        config: architecture; validated on construction.
        neuron: factory of the spiking nonlinearity; default LIF from ``config.neuron``.
        token_block: token-mixing block class (``dim, grid, neuron, identity_bn`` kwargs).
        channel_block: channel-MLP block class (``dim, hidden, num_tokens, neuron`` kwargs).
    """

    def __init__(
        self,
        config: MixerSNNConfig,
        *,
        neuron: Optional[NeuronFactory] = None,
        token_block: Type[nn.Module] = SpikingTokenBlock,
        channel_block: Type[nn.Module] = SpikingChannelBlock,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        if neuron is None:
            neuron = functools.partial(LIF, **config.neuron.to_dict())
        stages = []
        for s, (C, H, depth) in enumerate(zip(config.widths, config.grids, config.depths)):
            if s == 0:
                embed: nn.Module = PatchEmbed(in_chans=config.in_chans, dim=C, patch_size=config.patch_size)
            elif config.spe:
                embed = SpikingPatchEncoding(in_dim=C // 2, out_dim=C, neuron=neuron)
            else:
                embed = ConvDownsample(in_dim=C // 2, out_dim=C, grid=config.grids[s - 1])
            blocks = [
                MixerBlock(
                    token=token_block(dim=C, grid=H, neuron=neuron, identity_bn=not config.spe),
                    channel=channel_block(
                        dim=C, hidden=config.hidden_dim(C), num_tokens=H * H, neuron=neuron
                    ),
                    neuron=neuron,
                )
                for _ in range(depth)
            ]
            stages.append(Stage(embed=embed, blocks=blocks, neuron=neuron))
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(dim=config.widths[-1], num_classes=config.num_classes)

    @property
    def T(self) -> int:
        return self.config.T

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> final spikes ``[T, B, C4, H4, W4]``."""
        cfg = self.config
        if img.dim() != 4 or img.shape[1] != cfg.in_chans or img.shape[2] != cfg.img_size or img.shape[3] != cfg.img_size:
            raise ValueError(
                f"expected images [B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}], got "
                f"{tuple(img.shape)}; the token-mixing weights and token-position BatchNorm fix "
                f"the resolution, so resize the input or build the model with a matching "
                f"img_size/in_chans"
            )
        x = self.stages[0](img, cfg.T)
        for stage in self.stages[1:]:
            x = stage(x)
        return x

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(img))
