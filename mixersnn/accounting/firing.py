"""Firing rates of every Conv/Linear layer's input, measured with forward pre-hooks.

The monitor rides along an ordinary forward pass (a trainer's eval loop, the energy CLI), so
collecting rates costs no extra forward passes:

    with FiringRateMonitor(model) as mon:
        for images, _ in loader:
            model(images)
    rates = mon.rates()          # {"stages.0.blocks.0.token.fuse": 0.12, ...}

Counts are accumulated as tensors on the activations' device and read back only when asked,
so the hooks never force a GPU synchronisation inside the loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["InputStats", "FiringRateMonitor"]


@dataclass(frozen=True)
class InputStats:
    """What a layer received over the monitored passes.

    Attributes:
        name: module path.
        layer_type: "Conv2d" or "Linear".
        elements: input elements seen (summed over calls, time steps and batch).
        nonzero: of those, how many were non-zero.
        non_binary: how many were neither 0 nor 1 (0 for a layer fed only spikes); ``None``
            when the monitor ran with ``check_binary=False``.
        calls: forward calls seen.
    """

    name: str
    layer_type: str
    elements: int
    nonzero: int
    non_binary: Optional[int]
    calls: int

    @property
    def rate(self) -> float:
        """Fraction of non-zero inputs: the firing rate when the input is spikes."""
        return self.nonzero / self.elements if self.elements else 0.0

    @property
    def is_binary(self) -> bool:
        """True when every input seen was 0 or 1 (and at least one was seen)."""
        if self.non_binary is None:
            raise ValueError(
                f"layer {self.name}: binary inputs were not checked; build the monitor with "
                f"FiringRateMonitor(model, check_binary=True)"
            )
        return self.elements > 0 and self.non_binary == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate"] = self.rate
        d["is_binary"] = None if self.non_binary is None else self.is_binary
        return d


class FiringRateMonitor:
    """Forward pre-hooks on every ``nn.Conv2d``/``nn.Linear`` of a model, accumulating input
    statistics over any number of forward passes.

    Use as a context manager (hooks are removed on exit, the counts stay readable) or call
    :meth:`attach`/:meth:`detach`. Gradients are untouched: the hooks only read detached
    inputs.

    Args:
        model: the network (original or folded MFI model; layer names are module paths).
        check_binary: also count inputs outside {0, 1} (needed by the MFI check; one more
            comparison per input element).
    """

    def __init__(self, model: nn.Module, *, check_binary: bool = True) -> None:
        self.model = model
        self.check_binary = check_binary
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._types: dict[str, str] = {}
        self._elements: dict[str, int] = {}
        self._nonzero: dict[str, torch.Tensor] = {}
        self._non_binary: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> "FiringRateMonitor":
        if self._handles:
            raise RuntimeError("FiringRateMonitor is already attached; detach() it before attaching again")
        for name, mod in self.model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                self._types[name] = type(mod).__name__
                self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "FiringRateMonitor":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget the counts (keep the hooks), e.g. at the start of each eval pass."""
        self._elements.clear()
        self._nonzero.clear()
        self._non_binary.clear()
        self._calls.clear()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            # Integer counts stay exact however many batches are summed (float32 would lose
            # units beyond 2**24 elements).
            nz = torch.count_nonzero(x)
            self._nonzero[name] = self._nonzero[name] + nz if name in self._nonzero else nz
            if self.check_binary:
                nb = torch.count_nonzero((x != 0) & (x != 1))
                self._non_binary[name] = self._non_binary[name] + nb if name in self._non_binary else nb
            self._elements[name] = self._elements.get(name, 0) + x.numel()
            self._calls[name] = self._calls.get(name, 0) + 1

        return hook

    # ------------------------------------------------------------------ results
    def stats(self) -> dict[str, InputStats]:
        """Per-layer statistics, in module order, for the layers that ran at least once."""
        out: dict[str, InputStats] = {}
        for name, layer_type in self._types.items():
            if name not in self._elements:
                continue
            nb: Optional[torch.Tensor] = self._non_binary.get(name)
            out[name] = InputStats(
                name=name,
                layer_type=layer_type,
                elements=self._elements[name],
                nonzero=int(self._nonzero[name].item()),
                non_binary=int(nb.item()) if nb is not None else None,
                calls=self._calls[name],
            )
        return out

    def rates(self) -> dict[str, float]:
        """``{layer name: fraction of non-zero inputs}`` for every layer that ran."""
        return {k: v.rate for k, v in self.stats().items()}
