"""Backend registry for the multi-step LIF core.

A backend is a function ``fn(x_seq, v0, params, *, v_final=True) -> (spikes, v_final)`` that
implements the exact equations of ``mixersnn.neurons.functional`` (forward and BPTT); ``v0``
None starts from rest (``LIFParams.v_rest``: v_reset for a hard reset, 0 for a soft one), and
with ``v_final=False`` it returns None for the final membrane. Backends register here;
``resolve_backend`` picks one for a tensor, and never falls back silently: asking for a
backend that cannot run raises with the reason.

"torch" (the reference) is always available. ``mixersnn.kernels`` registers the fused ones
("cpu", "cupy") when it is imported, which ``mixersnn.neurons`` does lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["LIFParams", "Backend", "register_backend", "resolve_backend", "available_backends"]


@dataclass(frozen=True)
class LIFParams:
    """Resolved, validated neuron options shared by every backend.

    Attributes:
        tau: membrane time constant (>= 1).
        v_threshold: firing threshold.
        v_reset: reset potential for a hard reset, or ``None`` for a soft reset
            (subtract the threshold; the charge step then uses V_reset = 0).
        decay_input: whether the input is divided by tau in the charge step.
        detach_reset: treat spikes as constants inside the reset (no gradient through it).
        surrogate: surrogate gradient name ("sigmoid" or "atan").
        alpha: surrogate sharpness (already resolved from the surrogate's default).

    No defaults: build one with :func:`mixersnn.neurons.make_lif_params`, which holds them and
    checks the values.
    """

    tau: float
    v_threshold: float
    v_reset: Optional[float]
    decay_input: bool
    detach_reset: bool
    surrogate: str
    alpha: float

    @property
    def hard_reset(self) -> bool:
        return self.v_reset is not None

    @property
    def v_reset_charge(self) -> float:
        """The V_reset used in the charge step (0 for a soft reset)."""
        return 0.0 if self.v_reset is None else float(self.v_reset)

    @property
    def v_rest(self) -> float:
        """The membrane a sample starts from when no initial one is given: the resting
        potential the leak settles to without input, v_reset for a hard reset (as SpikingJelly
        starts its neurons) and 0 for a soft one. It equals :attr:`v_reset_charge`, which is
        what the fused kernels receive and start from."""
        return self.v_reset_charge


# fn(x_seq, v0 or None (start at params.v_rest), params, *, v_final: bool = True)
#   -> (spikes, v_final or None)
BackendFn = Callable[..., "tuple[torch.Tensor, Optional[torch.Tensor]]"]


@dataclass(frozen=True)
class Backend:
    """A registered LIF implementation.

    Attributes:
        name: the value users pass as ``backend=``.
        fn: the implementation.
        devices: device types it runs on ("cpu", "cuda").
        available: returns ``None`` when usable, or a human-readable reason why not.
        priority: ``auto`` picks the highest-priority available backend for the device.
    """

    name: str
    fn: BackendFn
    devices: tuple[str, ...]
    available: Callable[[], Optional[str]]
    priority: int = 0


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _BACKENDS[backend.name] = backend


def _ensure_kernels_loaded() -> None:
    # The fused kernels live in mixersnn.kernels, which registers itself on import. Importing
    # it here (not at module import) keeps the neuron core importable when a kernel module
    # has a problem; a real import error is raised, not swallowed.
    try:
        import mixersnn.kernels  # noqa: F401
    except ModuleNotFoundError as err:  # the kernels package may not exist in a stripped build
        if err.name != "mixersnn.kernels":
            raise


def available_backends(device_type: Optional[str] = None) -> dict[str, Optional[str]]:
    """Every registered backend with ``None`` (usable) or the reason it cannot run.

    Args:
        device_type: restrict to backends that run on this device type ("cpu", "cuda").
    """
    _ensure_kernels_loaded()
    out: dict[str, Optional[str]] = {}
    for name, b in _BACKENDS.items():
        if device_type is not None and device_type not in b.devices:
            continue
        out[name] = b.available()
    return out


def check_backend_name(name: str) -> None:
    """Raise at once if ``name`` is neither "auto" nor a registered, runnable backend."""
    _ensure_kernels_loaded()
    if name == "auto":
        return
    if name not in _BACKENDS:
        raise ValueError(
            f"backend={name!r} is not known; choose 'auto' or one of {sorted(_BACKENDS)}"
        )
    reason = _BACKENDS[name].available()
    if reason is not None:
        raise RuntimeError(
            f"backend={name!r} cannot run here: {reason}. Use backend='auto' to pick the "
            f"fastest backend that works, or 'torch' for the reference."
        )


def resolve_backend(name: str, x: torch.Tensor) -> Backend:
    """Pick the backend for tensor ``x``.

    ``"auto"`` takes the highest-priority available backend for ``x``'s device; a named
    backend must be available and support the device, or this raises with the reason.
    """
    _ensure_kernels_loaded()
    dev = x.device.type
    if name == "auto":
        candidates = [
            b for b in _BACKENDS.values() if dev in b.devices and b.available() is None
        ]
        if not candidates:
            raise RuntimeError(f"no LIF backend runs on device {dev!r}")
        return max(candidates, key=lambda b: b.priority)
    check_backend_name(name)
    b = _BACKENDS[name]
    if dev not in b.devices:
        raise RuntimeError(
            f"backend={name!r} runs on {list(b.devices)} tensors, got a {dev!r} tensor; move the "
            f"input or use backend='auto'"
        )
    return b
