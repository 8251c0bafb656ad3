"""SOPs, MACs and energy per image, per layer and in total (design doc section 6).

    SOPs   = T * sum over spike-input layers of (input firing rate * dense ACs per step)
    MACs   = first conv once + classifier T times (the real-input layers)
    energy = mac_pj * MACs + ac_pj * SOPs        (45 nm, Horowitz 2014: 4.6 pJ, 0.9 pJ)

All figures are per image (one sample through all T steps).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from mixersnn.accounting.firing import FiringRateMonitor
from mixersnn.accounting.ops import LayerOps, ModelSize, dense_op_counts, model_size
from mixersnn.models.config import MixerSNNConfig

__all__ = ["EnergyConstants", "EnergyRow", "EnergyReport", "energy_report", "measure_energy"]


@dataclass(frozen=True)
class EnergyConstants:
    """Energy per operation in picojoules (defaults: 45 nm CMOS, Horowitz 2014, 32-bit float).

    Attributes:
        mac_pj: one multiply-accumulate (real-valued input).
        ac_pj: one accumulate (a synaptic operation driven by a spike).
    """

    mac_pj: float = 4.6
    ac_pj: float = 0.9

    def __post_init__(self) -> None:
        for name in ("mac_pj", "ac_pj"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"{name}={v!r} is out of range: energy per operation must be a number >= 0 (pJ)")


@dataclass(frozen=True)
class EnergyRow:
    """One layer of the energy table (per image, all T steps).

    Attributes:
        name: module path.
        layer_type: "Conv2d" or "Linear".
        input_kind: "real" or "spike".
        dense_ops: weight applications per image per executed step.
        steps: executions per image (1 for the first conv, else T).
        rate: measured input firing rate (spike layers), ``None`` for real-input layers.
        macs: multiply-accumulates per image (real-input layers: ``dense_ops * steps``).
        sops: synaptic operations per image (spike layers: ``steps * rate * dense_ops``).
        energy_pj: ``mac_pj * macs + ac_pj * sops``.
    """

    name: str
    layer_type: str
    input_kind: str
    dense_ops: int
    steps: int
    rate: Optional[float]
    macs: float
    sops: float
    energy_pj: float


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer table and totals.

    Attributes:
        rows: one :class:`EnergyRow` per Conv/Linear layer, in forward order.
        constants: energy per operation used.
        T: time steps.
        img_size: input side in pixels.
        rates_measured: True when the rates came from data, False for the dense bound (rate 1).
        images: images the rates were measured on (0 for the dense bound).
        size: parameters and bytes of the model, when known.
    """

    rows: tuple[EnergyRow, ...]
    constants: EnergyConstants
    T: int
    img_size: int
    rates_measured: bool
    images: int = 0
    size: Optional[ModelSize] = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ totals
    @property
    def dense_acs_per_step(self) -> int:
        """Dense ACs per image per step (the paper's figure): spike layers, every input firing."""
        return sum(r.dense_ops for r in self.rows if r.input_kind == "spike")

    @property
    def macs(self) -> float:
        return float(sum(r.macs for r in self.rows))

    @property
    def sops(self) -> float:
        return float(sum(r.sops for r in self.rows))

    @property
    def energy_pj(self) -> float:
        return float(sum(r.energy_pj for r in self.rows))

    @property
    def mean_rate(self) -> float:
        """Input firing rate averaged over spike layers, weighted by their dense ACs."""
        dense = self.dense_acs_per_step * self.T
        return self.sops / dense if dense else 0.0

    def totals(self) -> dict[str, float]:
        t: dict[str, float] = {
            "dense_acs_per_step": self.dense_acs_per_step,
            "macs": self.macs,
            "sops": self.sops,
            "mean_rate": self.mean_rate,
            "energy_pj": self.energy_pj,
            "energy_uj": self.energy_pj * 1e-6,
        }
        if self.size is not None:
            t.update({k: v for k, v in self.size.to_dict().items()})
        return t

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        return {
            "T": self.T,
            "img_size": self.img_size,
            "rates_measured": self.rates_measured,
            "images": self.images,
            "constants": asdict(self.constants),
            "meta": dict(self.meta),
            "layers": [asdict(r) for r in self.rows],
            "totals": self.totals(),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def format_table(self) -> str:
        """A fixed-width table a person can read, then the totals."""
        width = max([len("layer")] + [len(r.name) for r in self.rows])
        head = f"{'layer':<{width}}  {'type':<6} {'input':<5} {'dense/step':>11} {'rate':>6} {'MACs':>10} {'SOPs':>10} {'energy':>10}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            rate = "-" if r.rate is None else f"{r.rate:.3f}"
            lines.append(
                f"{r.name:<{width}}  {r.layer_type:<6} {r.input_kind:<5} {_si(r.dense_ops):>11} {rate:>6} "
                f"{_si(r.macs):>10} {_si(r.sops):>10} {_pj(r.energy_pj):>10}"
            )
        lines.append("-" * len(head))
        how = f"rates measured on {self.images} images" if self.rates_measured else "dense bound: every input fires"
        lines.append(
            f"T={self.T}, {self.img_size} px, {how}; {self.constants.mac_pj} pJ/MAC, {self.constants.ac_pj} pJ/SOP; per image:"
        )
        lines.append(f"  dense ACs per step  {_si(self.dense_acs_per_step)}")
        lines.append(f"  MACs                {_si(self.macs)}")
        lines.append(f"  SOPs                {_si(self.sops)}   (mean input rate {self.mean_rate:.4f})")
        lines.append(f"  energy              {_pj(self.energy_pj)}")
        if self.size is not None:
            lines.append(
                f"  parameters          {self.size.num_params:,} ({_bytes(self.size.param_bytes)}; "
                f"buffers {_bytes(self.size.buffer_bytes)})"
            )
        return "\n".join(lines)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.4g}" if x != int(x) else f"{int(x)}"


def _pj(pj: float) -> str:
    for unit, scale in (("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3f} {unit}"
    return f"{pj:.3f} pJ"


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def energy_report(
    config: MixerSNNConfig,
    rates: Optional[Mapping[str, float]] = None,
    *,
    constants: EnergyConstants = EnergyConstants(),
    size: Optional[ModelSize] = None,
    images: int = 0,
    meta: Optional[Mapping[str, Any]] = None,
) -> EnergyReport:
    """Energy table of a model from its config and measured input firing rates (pure).

    Args:
        config: the architecture (shapes and T).
        rates: ``{layer name: input firing rate}`` from :meth:`FiringRateMonitor.rates`;
            ``None`` gives the dense upper bound (every input fires).
        constants: pJ per MAC and per AC.
        size: parameters/bytes to show with the totals.
        images: how many images the rates were measured on (for the printout).
        meta: free-form labels (model name, data source) carried into the JSON.

    Raises:
        KeyError: a spike-input layer has no rate (it did not run under the monitor).
        ValueError: a rate outside [0, 1].
    """
    rows = []
    for op in dense_op_counts(config):
        rows.append(_row(op, rates, constants))
    return EnergyReport(
        rows=tuple(rows),
        constants=constants,
        T=config.T,
        img_size=config.img_size,
        rates_measured=rates is not None,
        images=images,
        size=size,
        meta=dict(meta or {}),
    )


def _row(op: LayerOps, rates: Optional[Mapping[str, float]], c: EnergyConstants) -> EnergyRow:
    if op.input_kind == "real":
        macs = float(op.dense_ops * op.steps)
        return EnergyRow(op.name, op.layer_type, op.input_kind, op.dense_ops, op.steps, None, macs, 0.0, c.mac_pj * macs)
    if rates is None:
        rate = 1.0
    else:
        if op.name not in rates:
            raise KeyError(
                f"no firing rate for layer {op.name!r}: run the model's forward pass inside "
                f"FiringRateMonitor(model) before calling energy_report, or pass rates=None "
                f"for the dense bound"
            )
        rate = float(rates[op.name])
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate {rate} of layer {op.name!r} is out of range: a firing rate lies in [0, 1]")
    sops = op.steps * rate * op.dense_ops
    return EnergyRow(op.name, op.layer_type, op.input_kind, op.dense_ops, op.steps, rate, 0.0, sops, c.ac_pj * sops)


Batch = Union[torch.Tensor, tuple, list]


@torch.no_grad()
def measure_energy(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    max_batches: Optional[int] = None,
    constants: EnergyConstants = EnergyConstants(),
    meta: Optional[Mapping[str, Any]] = None,
) -> EnergyReport:
    """Run ``model`` in eval mode on ``batches`` and build its energy report.

    Args:
        model: a :class:`~mixersnn.models.MixerSNN` or folded MFI model (needs ``.config``).
        batches: images ``[B, C, H, W]`` or ``(images, labels, ...)`` tuples.
        max_batches: stop after this many batches (``None``: all).
        constants: pJ per MAC and per AC.
        meta: labels carried into the report.

    Raises:
        ValueError: no batch was given.
    """
    config: MixerSNNConfig = model.config  # type: ignore[assignment]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    images = 0
    try:
        with FiringRateMonitor(model, check_binary=False) as mon:
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device=device, dtype=dtype))
                images += x.shape[0]
    finally:
        model.train(was_training)
    if images == 0:
        raise ValueError("measure_energy got no batches: pass an iterable of image batches [B, C, H, W]")
    return energy_report(
        config, mon.rates(), constants=constants, size=model_size(model), images=images, meta=meta
    )
