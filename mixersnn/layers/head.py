"""Classifier head."""

from __future__ import annotations

import torch
from torch import nn

from mixersnn.layers.common import fold, unfold

__all__ = ["ClassifierHead"]


class ClassifierHead(nn.Module):
    """BatchNorm2d(C) on the final spikes, spatial mean, Linear(C -> K); no LIF before it.

    Args:
        dim: final stage width.
        num_classes: K.
    """

    def __init__(self, *, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` spikes -> per-step logits ``[T, B, K]``."""
        T = x.shape[0]
        return unfold(self.fc(self.bn(fold(x)).mean(dim=(2, 3))), T)
