"""Accounting beside the model: dense op counts, firing rates, SOPs and energy, the MFI check
and the BatchNorm-folded MFI export (design doc section 6). Pure torch; no Ray or MLflow."""

from __future__ import annotations

from mixersnn.accounting.energy import EnergyConstants, EnergyReport, EnergyRow, energy_report, measure_energy
from mixersnn.accounting.firing import FiringRateMonitor, InputStats
from mixersnn.accounting.mfi import EXEMPT_LAYERS, MFIReport, MFIViolation, check_mfi, runtime_ops
from mixersnn.accounting.mfi_export import (
    MFIMixerSNN,
    compare_spikes,
    fold_mfi,
    load_mfi,
    save_mfi,
)
from mixersnn.accounting.ops import (
    CLASSIFIER,
    FIRST_CONV,
    LayerOps,
    ModelSize,
    dense_ac_total,
    dense_mac_total,
    dense_op_counts,
    model_size,
)
from mixersnn.accounting.zero_cost import hamming_kernel, hamming_score, rank_correlation, score_config

__all__ = [
    "CLASSIFIER",
    "EXEMPT_LAYERS",
    "EnergyConstants",
    "EnergyReport",
    "EnergyRow",
    "FIRST_CONV",
    "FiringRateMonitor",
    "InputStats",
    "LayerOps",
    "MFIMixerSNN",
    "MFIReport",
    "MFIViolation",
    "ModelSize",
    "check_mfi",
    "compare_spikes",
    "dense_ac_total",
    "dense_mac_total",
    "dense_op_counts",
    "energy_report",
    "fold_mfi",
    "hamming_kernel",
    "hamming_score",
    "load_mfi",
    "measure_energy",
    "model_size",
    "rank_correlation",
    "runtime_ops",
    "save_mfi",
    "score_config",
]
