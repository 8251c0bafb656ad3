"""The functional multi-step LIF core: ``lif_multistep(x_seq, v_init) -> (spikes, v_final)``.

Equations (design doc section 2). Per step t, with H the membrane after charge, V after the
reset and S the spike:

    charge, decay_input:     H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau
    charge, no decay_input:  H[t] = V[t-1] - (V[t-1] - V_reset) / tau + X[t]
    fire:                    S[t] = 1 if H[t] - V_threshold >= 0 else 0
    hard reset:              V[t] = S[t] V_reset + (1 - S[t]) H[t]
    soft reset:              V[t] = H[t] - S[t] V_threshold      (V_reset = 0 when charging)

The reference ("torch") backend is a plain loop whose autograd is exactly the BPTT of these
equations, with the surrogate derivative standing in for dS/dH. Every other backend must
match it in spikes (exactly), final membrane and gradients (to float tolerance).
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch

from mixersnn.neurons.backends import (
    Backend,
    LIFParams,
    register_backend,
    resolve_backend,
)
from mixersnn.neurons.surrogate import get_surrogate, spike_fn

__all__ = ["lif_multistep", "make_lif_params", "lif_reference", "LIF_OPTIONS"]


def make_lif_params(
    *,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: Optional[float] = None,
) -> LIFParams:
    """Validate the neuron's options and resolve the surrogate's alpha.

    This is the one definition of the LIF options, their defaults and their checks:
    :func:`lif_multistep`, :class:`mixersnn.neurons.LIF` and ``NeuronConfig`` forward their
    options here (:data:`LIF_OPTIONS` lists the names).

    Args:
        tau: membrane time constant, >= 1.
        v_threshold: firing threshold.
        v_reset: hard-reset potential, or ``None`` for a soft reset.
        decay_input: divide the input by tau in the charge step.
        detach_reset: no gradient through the spike inside the reset.
        surrogate: "sigmoid" (alpha 4) or "atan" (alpha 2).
        alpha: surrogate sharpness; ``None`` takes the surrogate's default.

    Raises:
        ValueError: naming the bad value, the allowed range and the fix.
    """
    sg = get_surrogate(surrogate)
    tau = float(tau)
    if not tau >= 1.0:
        raise ValueError(
            f"tau={tau} is out of range; the leak factor 1 - 1/tau must lie in [0, 1), so "
            f"tau must be >= 1 (the paper uses tau=2.0)"
        )
    alpha_f = sg.default_alpha if alpha is None else float(alpha)
    if not alpha_f > 0:
        raise ValueError(
            f"alpha={alpha} must be > 0 (surrogate sharpness); pass None for the "
            f"{sg.name} default {sg.default_alpha}"
        )
    if v_reset is not None and not float(v_reset) < float(v_threshold):
        raise ValueError(
            f"v_reset={v_reset} must be below v_threshold={v_threshold}, or a neuron fires "
            f"forever after its first spike; use v_reset=0.0 (hard) or None (soft reset)"
        )
    return LIFParams(
        tau=tau,
        v_threshold=float(v_threshold),
        v_reset=None if v_reset is None else float(v_reset),
        decay_input=bool(decay_input),
        detach_reset=bool(detach_reset),
        surrogate=sg.name,
        alpha=alpha_f,
    )


#: The neuron's option names, in :func:`make_lif_params`' order (its keyword arguments).
LIF_OPTIONS: tuple[str, ...] = tuple(inspect.signature(make_lif_params).parameters)


def _lif_params(options: Mapping[str, Any]) -> LIFParams:
    """:func:`make_lif_params` on ``options``, first rejecting a name that is not an option
    with a TypeError that names it and the valid ones."""
    unknown = sorted(set(options) - set(LIF_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown neuron option(s) {unknown}; valid options are {list(LIF_OPTIONS)}"
        )
    return make_lif_params(**options)


def lif_reference(
    x_seq: torch.Tensor, v0: torch.Tensor, p: LIFParams, *, smooth: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference loop. Autograd through it is exact BPTT of the LIF equations.

    Args:
        x_seq: input current ``[T, ...]``.
        v0: initial membrane, shape ``x_seq.shape[1:]``.
        p: resolved neuron options.
        smooth: tests only. Replace the Heaviside by the surrogate's smooth primitive, so the
            forward is differentiable and its true gradient equals the surrogate BPTT; this
            lets ``gradcheck`` verify backward implementations numerically.

    Returns:
        ``(spikes [T, ...], v_final [...])``.
    """
    sg = get_surrogate(p.surrogate)
    inv_tau = 1.0 / p.tau
    vr = p.v_reset_charge
    v = v0
    out = []
    for t in range(x_seq.shape[0]):
        x = x_seq[t]
        if p.decay_input:
            h = v + (x - (v - vr)) * inv_tau
        else:
            h = v - (v - vr) * inv_tau + x
        u = h - p.v_threshold
        s = sg.primitive(u, p.alpha) if smooth else spike_fn(u, p.surrogate, p.alpha)
        s_r = s.detach() if p.detach_reset else s
        if p.hard_reset:
            v = s_r * vr + (1.0 - s_r) * h
        else:
            v = h - s_r * p.v_threshold
        out.append(s)
    return torch.stack(out), v


def lif_reference_backend(
    x_seq: torch.Tensor, v0: Optional[torch.Tensor], p: LIFParams, *, v_final: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The "torch" backend: :func:`lif_reference` behind the backend interface (``v0`` None
    starts from rest, ``p.v_rest``; ``v_final`` False returns None for the final membrane)."""
    if v0 is None:
        v0 = torch.full_like(x_seq[0], p.v_rest)
    spikes, v = lif_reference(x_seq, v0, p)
    return spikes, v if v_final else None


register_backend(
    Backend(
        name="torch",
        fn=lif_reference_backend,
        devices=("cpu", "cuda", "mps", "xpu"),
        available=lambda: None,
        priority=0,
    )
)


def lif_multistep(
    x_seq: torch.Tensor,
    v_init: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
    return_v_final: bool = True,
    **options: Any,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-step leaky integrate-and-fire neuron, stateless.

    Args:
        x_seq: input current, ``[T, ...]`` with T >= 1, floating point.
        v_init: membrane before step 0, shape ``x_seq.shape[1:]``; ``None`` means every
            sample starts from rest, the potential the leak settles to: ``v_reset`` for a hard
            reset (SpikingJelly's start; 0 for the paper's neuron), 0 for a soft reset. So there
            is no state to reset between batches.
        backend: "auto" (fastest that works for the tensor's device), "torch" (reference),
            or a fused backend ("cpu", "cupy") once ``mixersnn.kernels`` provides it.
        return_v_final: False: the membrane after the last step is not kept (None is
            returned in its place). A layer that drops it should say so: the fused kernels
            then never write it, and with ``v_init`` None never read an initial membrane
            either, which at T=4 saves a fifth of the forward pass's memory traffic.
        options: the neuron's options (``tau=``, ``v_threshold=``, ...), see
            :func:`make_lif_params`; an unknown name raises TypeError.

    Returns:
        ``(spikes, v_final)``: spikes ``[T, ...]`` in ``x_seq``'s dtype with values in {0, 1},
        and the membrane after the last step ``[...]`` (None with ``return_v_final=False``).
    """
    _check_x_seq(x_seq)  # before the options, so a bad input is reported first
    return _lif_run(
        x_seq, v_init, _lif_params(options), backend=backend, return_v_final=return_v_final
    )


def _check_x_seq(x_seq: torch.Tensor) -> None:
    if x_seq.dim() < 1 or x_seq.shape[0] < 1:
        raise ValueError(
            f"x_seq must be time-first [T, ...] with T >= 1, got shape {tuple(x_seq.shape)}"
        )
    if not x_seq.is_floating_point():
        raise TypeError(f"x_seq must be a floating-point tensor, got {x_seq.dtype}")


def _lif_apply(
    x_seq: torch.Tensor,
    v_init: Optional[torch.Tensor],
    p: LIFParams,
    *,
    backend: str = "auto",
    return_v_final: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`lif_multistep` with the options already resolved by :func:`make_lif_params`
    (``p``), as :class:`mixersnn.neurons.LIF` holds them. Internal: the other arguments are
    lif_multistep's."""
    _check_x_seq(x_seq)
    return _lif_run(x_seq, v_init, p, backend=backend, return_v_final=return_v_final)


def _lif_run(
    x_seq: torch.Tensor,
    v_init: Optional[torch.Tensor],
    p: LIFParams,
    *,
    backend: str,
    return_v_final: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`_lif_apply` after ``x_seq`` was checked: the initial membrane, then the backend."""
    if v_init is None:
        v0 = None  # rest (p.v_rest), which every backend starts from without reading a tensor
    else:
        if tuple(v_init.shape) != tuple(x_seq.shape[1:]):
            raise ValueError(
                f"v_init has shape {tuple(v_init.shape)} but must match one time step of "
                f"x_seq, {tuple(x_seq.shape[1:])}"
            )
        v0 = v_init.to(dtype=x_seq.dtype, device=x_seq.device)
    return resolve_backend(backend, x_seq).fn(x_seq, v0, p, v_final=return_v_final)
