"""Dense operation counts of every Conv/Linear layer, from the config's shapes alone.

The counts are per image and per executed time step, the unit of the paper's "dense ACs":
``fan_in * outputs`` weight applications (one accumulate each when the input is a spike, one
multiply-accumulate when it is real). What is counted, and why, so it matches the paper's
figures (MLP-SPE-T: 99.1 M dense ACs at 32 px, 4.97 G at 224 px, design doc section 6):

* every Conv2d/Linear whose input is spikes: all kernel taps, including the taps that fall on
  zero padding of the 3x3 SPE convs (the usual "dense" convention; the measured firing rate
  is taken on the unpadded input, so SOPs of those convs are a slight over-estimate);
* not counted: bias additions, BatchNorm (folded into the weights at inference), residual
  additions, the spatial mean of the head and the LIF updates (a halving, an add and a
  compare per neuron). The paper's totals exclude them too: with the BN outputs included the
  224-px total would be 4.976 G instead of 4.971 G;
* the two real-input layers, the first conv (pixels) and the classifier (after BN + mean), are
  MACs and are not part of the dense AC total. The first conv sees the same image at every
  step (direct encoding), and :class:`~mixersnn.layers.PatchEmbed` runs it once and broadcasts
  the result, so it is counted once per image (``steps == 1``), not T times as in the
  reference code. The classifier runs at every step (per-step logits).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import nn

from mixersnn.models.config import MixerSNNConfig

__all__ = [
    "FIRST_CONV",
    "CLASSIFIER",
    "LayerOps",
    "dense_op_counts",
    "dense_ac_total",
    "dense_mac_total",
    "ModelSize",
    "model_size",
]

FIRST_CONV = "stages.0.embed.conv"
"""Module path of the stage-1 patch conv: the only layer that sees real-valued pixels."""

CLASSIFIER = "head.fc"
"""Module path of the classifier: its input (BN + spatial mean of spikes) is real-valued."""

InputKind = Literal["real", "spike"]


@dataclass(frozen=True)
class LayerOps:
    """Shape-derived cost of one Conv2d/Linear layer.

    Attributes:
        name: module path in :class:`~mixersnn.models.MixerSNN` (and in the folded MFI model,
            which keeps the same paths), e.g. ``"stages.1.blocks.0.channel.fc1"``.
        layer_type: "Conv2d" or "Linear".
        input_kind: "real" (MACs) or "spike" (accumulates, scaled by the firing rate).
        fan_in: weights feeding one output (in_channels * kernel area, or in_features).
        outputs: output elements per image per time step.
        steps: executions per image: 1 for the first conv (broadcast over T), else T.
    """

    name: str
    layer_type: str
    input_kind: InputKind
    fan_in: int
    outputs: int
    steps: int

    @property
    def dense_ops(self) -> int:
        """Weight applications per image per executed step, ``fan_in * outputs``."""
        return self.fan_in * self.outputs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dense_ops"] = self.dense_ops
        return d


def dense_op_counts(config: MixerSNNConfig) -> list[LayerOps]:
    """Every Conv2d/Linear of the network with its dense cost, in forward order.

    Args:
        config: the model's architecture.

    Returns:
        One :class:`LayerOps` per layer; the first is :data:`FIRST_CONV`, the last
        :data:`CLASSIFIER`. Counts are per image per executed step (see the module docstring
        for what is and is not counted).
    """
    T = config.T
    rows: list[LayerOps] = []

    def add(name: str, layer_type: str, fan_in: int, outputs: int, *, kind: InputKind = "spike", steps: int = T) -> None:
        rows.append(LayerOps(name, layer_type, kind, int(fan_in), int(outputs), int(steps)))

    widths = config.widths
    for s, (C, H, depth) in enumerate(zip(widths, config.grids, config.depths)):
        N = H * H
        pre = f"stages.{s}"
        if s == 0:
            add(FIRST_CONV, "Conv2d", config.in_chans * config.patch_size**2, C * N, kind="real", steps=1)
        elif config.spe:
            n, c_in = C // 3, widths[s - 1]
            add(f"{pre}.embed.down.conv", "Conv2d", c_in * 9, 3 * n * N)  # a1, a2, a3 merged
            add(f"{pre}.embed.conv12.conv", "Conv2d", n * 9, n * N)
            add(f"{pre}.embed.conv23.conv", "Conv2d", n * 9, n * N)
        else:
            add(f"{pre}.embed.conv", "Conv2d", widths[s - 1] * 4, C * N)
        hidden = config.hidden_dim(C)
        for b in range(depth):
            blk = f"{pre}.blocks.{b}"
            # proj_h: an HxH weight applied at each of the C*W (channel, column) positions.
            add(f"{blk}.token.proj_h", "Conv2d", H, H * C * H)
            add(f"{blk}.token.proj_w", "Conv2d", H, H * C * H)
            add(f"{blk}.token.fuse", "Conv2d", 3 * C, C * N)
            add(f"{blk}.channel.fc1", "Linear", C, hidden * N)
            add(f"{blk}.channel.fc2", "Linear", hidden, C * N)
    add(CLASSIFIER, "Linear", config.widths[-1], config.num_classes, kind="real")
    return rows


def dense_ac_total(config: MixerSNNConfig) -> int:
    """Dense ACs per image per time step: the spike-input layers as if every input fired.

    This is the quantity the paper quotes (MLP-SPE-T: ~99 M at 32 px, ~4.97 G at 224 px).
    """
    return sum(r.dense_ops for r in dense_op_counts(config) if r.input_kind == "spike")


def dense_mac_total(config: MixerSNNConfig) -> int:
    """MACs per image over all T steps: the first conv once, the classifier T times."""
    return sum(r.dense_ops * r.steps for r in dense_op_counts(config) if r.input_kind == "real")


@dataclass(frozen=True)
class ModelSize:
    """Parameter count and storage of a model.

    Attributes:
        num_params: trainable-or-not parameters (BN running statistics excluded).
        param_bytes: bytes of the parameters at their stored dtype.
        buffer_bytes: bytes of the buffers (BN running statistics, counters).
    """

    num_params: int
    param_bytes: int
    buffer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes

    def to_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def model_size(model: nn.Module) -> ModelSize:
    """Parameters and bytes of ``model`` (shared tensors are counted once)."""
    seen: set[int] = set()
    n = pb = bb = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
        pb += p.numel() * p.element_size()
    for b in model.buffers():
        if id(b) in seen:
            continue
        seen.add(id(b))
        bb += b.numel() * b.element_size()
    return ModelSize(num_params=n, param_bytes=pb, buffer_bytes=bb)
