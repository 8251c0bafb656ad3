"""Thin ``nn.Module`` wrapper around the functional LIF core."""

from __future__ import annotations

import importlib
from typing import Any, Optional

import torch
from torch import nn

from mixersnn.neurons.backends import check_backend_name
from mixersnn.neurons.functional import _lif_params, _lif_apply

__all__ = ["LIF", "time_major"]


def time_major(x: torch.Tensor) -> tuple[torch.Tensor, Optional[list[int]]]:
    """``x`` as a contiguous tensor with time (dim 0) outermost, and the permutation back.

    The neuron is elementwise per time step, so it may run on any arrangement of the other
    axes. The layers keep activations channels-last (``[T, B, C, H, W]`` shapes whose memory
    is ``[T, B, H, W, C]``), where ``.contiguous()`` would copy into NCHW and every later
    layer would copy back. Here the axes are instead permuted (a view) into memory order, so
    a dense input costs nothing, and only a non-dense one (a channel slice, a broadcast over
    T) is copied, once, in the order its strides suggest.

    Returns:
        ``(y, inverse)``: ``y`` contiguous, with ``y.permute(inverse)`` shaped like ``x``;
        ``inverse`` is None when ``x`` is already contiguous (``y`` is ``x``).
    """
    if x.is_contiguous():
        return x, None
    rest = sorted(range(1, x.dim()), key=lambda d: (-x.stride(d), d))
    order = [0, *rest]
    y = x.permute(order).contiguous()
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return y, inverse


def _fused_devices(backend: str) -> frozenset[str]:
    """Device types on which ``backend`` runs a fused kernel ("cpu" or "cupy")."""
    from mixersnn.neurons.backends import available_backends

    usable = {name for name, reason in available_backends().items() if reason is None}
    fused = {"cpu": "cpu", "cuda": "cupy"}
    if backend == "auto":
        devices = frozenset(dev for dev, name in fused.items() if name in usable)
    else:
        devices = frozenset(dev for dev, name in fused.items() if name == backend and name in usable)
    if devices:
        importlib.import_module("mixersnn.kernels.custom_op")  # registers the ops before any tracing
    return devices


class LIF(nn.Module):
    """Multi-step LIF layer: ``[T, ...]`` currents in, ``[T, ...]`` spikes out.

    Stateless: every call starts from rest (v = v_reset for a hard reset, 0 for a soft one), so
    nothing leaks between batches and there is no ``reset_net`` to remember. The options are
    validated and the backend is checked here, at construction, so a bad option or an
    unavailable backend fails before any training.

    Args:
        backend: as in :func:`mixersnn.neurons.lif_multistep`.
        options: the neuron's options (``tau=``, ``v_threshold=``, ...), see
            :func:`mixersnn.neurons.make_lif_params`; an unknown name raises TypeError.
    """

    def __init__(self, *, backend: str = "auto", **options: Any) -> None:
        super().__init__()
        self.params = _lif_params(options)
        check_backend_name(backend)
        self.backend = backend
        # Device types whose backend here is a fused kernel: under torch.compile the neuron
        # is then the ``mixersnn::lif_forward`` custom op (traceable), not the eager
        # autograd.Function around ctypes/CuPy (a graph break at every neuron). Decided once,
        # so the compiled graph sees a constant.
        self._op_devices = _fused_devices(backend)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``[T, ...]`` currents -> spikes of the same shape and memory layout."""
        p = self.params
        x, inverse = time_major(x_seq)
        if torch.compiler.is_compiling() and x.device.type in self._op_devices:
            from mixersnn.kernels.custom_op import lif_op, op_supports

            if op_supports(x):
                spikes = lif_op(x, p)
                return spikes if inverse is None else spikes.permute(inverse)
        # every sample starts from rest; the final membrane is unused
        spikes, _ = _lif_apply(x, None, p, backend=self.backend, return_v_final=False)
        return spikes if inverse is None else spikes.permute(inverse)

    def extra_repr(self) -> str:
        p = self.params
        reset = "soft" if p.v_reset is None else f"hard(v_reset={p.v_reset})"
        return (
            f"tau={p.tau}, v_threshold={p.v_threshold}, {reset}, decay_input={p.decay_input}, "
            f"detach_reset={p.detach_reset}, surrogate={p.surrogate}(alpha={p.alpha}), "
            f"backend={self.backend}"
        )
