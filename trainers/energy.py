"""Energy and MFI accounting inside training: firing rates collected during the normal eval
pass (no extra forward passes), summed over every rank, turned into SOPs and energy."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from mixersnn.accounting import FiringRateMonitor, check_mfi, energy_report, model_size
from mixersnn.models import MixerSNN, MixerSNNConfig

__all__ = ["EnergyMeter", "mfi_report"]


class EnergyMeter:
    """Input firing rates of every Conv/Linear over the eval set, all ranks together.

    Args:
        model: the unwrapped model (hooks fire through a DDP wrapper too).
    """

    def __init__(self, model: MixerSNN) -> None:
        self.model = model
        self.monitor = FiringRateMonitor(model, check_binary=False)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks are attached only inside this block (the eval forward), never in training."""
        self.monitor.attach()
        try:
            yield
        finally:
            self.monitor.detach()

    def reset(self) -> None:
        self.monitor.reset()

    def rates(self) -> dict[str, float]:
        stats = self.monitor.stats()
        names = list(stats)
        counts = [float(stats[n].nonzero) for n in names] + [float(stats[n].elements) for n in names]
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor(counts, dtype=torch.float64)
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            counts = t.tolist()
        k = len(names)
        return {n: counts[i] / counts[k + i] if counts[k + i] else 0.0 for i, n in enumerate(names)}

    def summary(self, config: MixerSNNConfig) -> dict[str, float]:
        """Per-image SOPs, MACs, energy (uJ) and the mean input firing rate of spike layers."""
        rates = self.rates()
        if not rates:
            return {}
        rep = energy_report(config, rates, size=model_size(self.model))
        return {
            "sops_per_image": rep.sops,
            "macs_per_image": rep.macs,
            "energy_per_image_uj": rep.energy_pj * 1e-6,
            "mean_firing_rate": rep.mean_rate,
        }


def mfi_report(model: MixerSNN, images: torch.Tensor) -> dict[str, Any]:
    """The MFI check on a real batch, as a JSON-able dict."""
    return check_mfi(model, images).to_dict()
