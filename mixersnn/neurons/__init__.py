"""Spiking neurons: the functional multi-step LIF core, its module and surrogates."""

from __future__ import annotations

from mixersnn.neurons.backends import LIFParams, available_backends, register_backend
from mixersnn.neurons.functional import lif_multistep, lif_reference, make_lif_params
from mixersnn.neurons.modules import LIF
from mixersnn.neurons.surrogate import SURROGATES, get_surrogate, spike_fn

__all__ = [
    "LIF",
    "LIFParams",
    "SURROGATES",
    "available_backends",
    "get_surrogate",
    "lif_multistep",
    "lif_reference",
    "make_lif_params",
    "register_backend",
    "spike_fn",
]
