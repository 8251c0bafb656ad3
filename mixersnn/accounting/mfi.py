"""Multiplication-free inference (MFI) check (design doc section 6).

A network is MFI when every Conv/Linear receives binary {0, 1} input (so it only accumulates
weights) and nothing in eval mode needs runtime statistics or per-element products of
activations. Two layers are exempt by design: the first conv (real pixels) and the
classifier (BN + spatial mean of spikes). The search uses :func:`check_mfi` as a hard
constraint: a candidate is admissible when ``report.ok``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from mixersnn.accounting.firing import FiringRateMonitor
from mixersnn.accounting.ops import CLASSIFIER, FIRST_CONV

__all__ = ["MFIViolation", "MFIReport", "check_mfi", "runtime_ops", "EXEMPT_LAYERS"]

EXEMPT_LAYERS: tuple[str, ...] = (FIRST_CONV, CLASSIFIER)
"""The two layers whose real-valued input the architecture accepts by design."""

# Modules that need per-sample statistics or products of activations at inference.
_NORMS_WITH_RUNTIME_STATS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.CrossMapLRN2d)
_NON_MFI_OPS = (
    nn.MultiheadAttention,
    nn.Softmax,
    nn.LogSoftmax,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Mish,
    nn.ELU,
    nn.Softplus,
)


@dataclass(frozen=True)
class MFIViolation:
    """One reason a model is not multiplication-free.

    Attributes:
        name: module path.
        module_type: class name of the module.
        reason: "non-binary input" or why the op breaks MFI.
        non_binary_fraction: for "non-binary input", the fraction of inputs outside {0, 1}.
    """

    name: str
    module_type: str
    reason: str
    non_binary_fraction: float = 0.0


@dataclass(frozen=True)
class MFIReport:
    """Result of :func:`check_mfi`.

    Attributes:
        non_binary_layers: Conv/Linear layers that received non-binary input, in module order.
        runtime_ops: modules that break MFI whatever their input.
        exempt: layer names allowed to see real input (first conv, classifier).
        images: images the input check ran on.
    """

    non_binary_layers: tuple[MFIViolation, ...]
    runtime_ops: tuple[MFIViolation, ...]
    exempt: tuple[str, ...]
    images: int

    @property
    def non_binary_names(self) -> list[str]:
        return [v.name for v in self.non_binary_layers]

    @property
    def violations(self) -> list[MFIViolation]:
        """Everything that breaks MFI beyond the exempt input/output layers."""
        extra = [v for v in self.non_binary_layers if v.name not in self.exempt]
        return extra + list(self.runtime_ops)

    @property
    def ok(self) -> bool:
        """MFI apart from the exempt layers: the search's hard constraint."""
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "images": self.images,
            "exempt": list(self.exempt),
            "non_binary_layers": [asdict(v) for v in self.non_binary_layers],
            "runtime_ops": [asdict(v) for v in self.runtime_ops],
            "violations": [asdict(v) for v in self.violations],
        }

    def format(self) -> str:
        lines = [f"MFI: {'ok' if self.ok else 'VIOLATED'} (checked on {self.images} images)"]
        for v in self.non_binary_layers:
            tag = "exempt" if v.name in self.exempt else "VIOLATION"
            lines.append(f"  {tag:<9} {v.name} ({v.module_type}): {v.reason}, {v.non_binary_fraction:.3f} of inputs")
        for v in self.runtime_ops:
            lines.append(f"  VIOLATION {v.name} ({v.module_type}): {v.reason}")
        return "\n".join(lines)


def runtime_ops(model: nn.Module) -> list[MFIViolation]:
    """Modules that break MFI in eval mode regardless of their input.

    Norms with runtime statistics (LayerNorm, GroupNorm, LRN; InstanceNorm and BatchNorm that
    do not use running statistics in eval) need a division by a per-sample statistic;
    attention, softmax and smooth activations need products of activations or exponentials.
    BatchNorm with running statistics is fine: it folds into the neighbouring weights.
    Products written inline in a ``forward`` (not as modules) are not visible here; the
    input-binary check catches those that feed a Conv/Linear.
    """
    out = []
    for name, mod in model.named_modules():
        t = type(mod).__name__
        if isinstance(mod, _NORMS_WITH_RUNTIME_STATS) or (hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm)):
            out.append(MFIViolation(name, t, "normalises with per-sample statistics at inference"))
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            # InstanceNorm never uses running stats unless track_running_stats; BatchNorm
            # without them falls back to batch statistics in eval.
            if not mod.track_running_stats or mod.running_mean is None:
                out.append(MFIViolation(name, t, "uses batch/instance statistics in eval (no running statistics to fold)"))
        elif isinstance(mod, _NON_MFI_OPS):
            out.append(MFIViolation(name, t, "multiplies activations or evaluates a transcendental at inference"))
    return out


@torch.no_grad()
def check_mfi(
    model: nn.Module,
    images: torch.Tensor,
    *,
    exempt: Sequence[str] = EXEMPT_LAYERS,
) -> MFIReport:
    """List every Conv/Linear fed non-binary input (measured on ``images``) and every op that
    breaks MFI.

    Args:
        model: the network; run in eval mode (its mode is restored afterwards).
        images: a real batch ``[B, C, H, W]`` (normalised as in training).
        exempt: layers allowed real input; default the first conv and the classifier.

    Returns:
        :class:`MFIReport`; for every registered variant ``non_binary_names`` is exactly
        ``[FIRST_CONV, CLASSIFIER]`` and ``ok`` is True.
    """
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a batch [B, C, H, W] with B >= 1, got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    try:
        with FiringRateMonitor(model, check_binary=True) as mon:
            model(images.to(device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    non_binary = tuple(
        MFIViolation(s.name, s.layer_type, "non-binary input", (s.non_binary or 0) / s.elements)
        for s in mon.stats().values()
        if not s.is_binary
    )
    return MFIReport(
        non_binary_layers=non_binary,
        runtime_ops=tuple(runtime_ops(model)),
        exempt=tuple(exempt),
        images=int(images.shape[0]),
    )
