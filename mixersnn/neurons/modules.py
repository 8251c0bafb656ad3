"""Thin ``nn.Module`` wrapper around the functional LIF core."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mixersnn.neurons.backends import check_backend_name
from mixersnn.neurons.functional import lif_multistep, make_lif_params

__all__ = ["LIF"]


class LIF(nn.Module):
    """Multi-step LIF layer: ``[T, ...]`` currents in, ``[T, ...]`` spikes out.

    Stateless: every call starts from rest (v = v_reset for a hard reset, 0 for a soft one), so
    nothing leaks between batches and there is no ``reset_net`` to remember. The options are
    validated and the backend is checked here, at construction, so a bad option or an
    unavailable backend fails before any training.

    Args:
        tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha, backend:
            as in :func:`mixersnn.neurons.lif_multistep`.
    """

    def __init__(
        self,
        *,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        v_reset: Optional[float] = 0.0,
        decay_input: bool = True,
        detach_reset: bool = False,
        surrogate: str = "sigmoid",
        alpha: Optional[float] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.params = make_lif_params(
            tau=tau,
            v_threshold=v_threshold,
            v_reset=v_reset,
            decay_input=decay_input,
            detach_reset=detach_reset,
            surrogate=surrogate,
            alpha=alpha,
        )
        check_backend_name(backend)
        self.backend = backend

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        p = self.params
        spikes, _ = lif_multistep(
            x_seq,
            tau=p.tau,
            v_threshold=p.v_threshold,
            v_reset=p.v_reset,
            decay_input=p.decay_input,
            detach_reset=p.detach_reset,
            surrogate=p.surrogate,
            alpha=p.alpha,
            backend=self.backend,
            return_v_final=False,  # every sample starts from rest; the final membrane is unused
        )
        return spikes

    def extra_repr(self) -> str:
        p = self.params
        reset = "soft" if p.v_reset is None else f"hard(v_reset={p.v_reset})"
        return (
            f"tau={p.tau}, v_threshold={p.v_threshold}, {reset}, decay_input={p.decay_input}, "
            f"detach_reset={p.detach_reset}, surrogate={p.surrogate}(alpha={p.alpha}), "
            f"backend={self.backend}"
        )
