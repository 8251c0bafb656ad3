"""The fused LIF as ``torch.library`` custom ops, so ``torch.compile`` traces through it.

Eager code calls the backends through :class:`~mixersnn.kernels._function.FusedLIF` (an
``autograd.Function`` around ctypes/CuPy launches), which TorchDynamo cannot trace: every LIF
would break the graph, and the compiler could fuse nothing across a neuron. Registered as
custom ops with a fake (shape) rule and an autograd rule, the neuron becomes one opaque node
of the graph, forward and backward, with the BatchNorms, adds and reshapes around it compiled
and fused.

Two ops, both functional (no mutation, outputs never alias inputs):

- ``mixersnn::lif_forward(x, <neuron options>, save) -> (spikes, u)``: the multi-step LIF from
  rest over ``x [T, ...]``; ``u = H - v_threshold`` is returned for backward when ``save``
  (else an empty tensor). The final membrane is not produced: the model's neurons drop it.
- ``mixersnn::lif_backward(u, grad_spikes, <neuron options>) -> grad_x``: exact BPTT.

Both run on the CPU (``lif.cu``'s host build, fp32) and on CUDA (the CuPy kernels, fp32, fp16,
bf16), the same launchers the eager backends use, so compiled and eager numbers agree.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mixersnn.neurons.backends import LIFParams

__all__ = ["lif_forward", "lif_backward", "lif_op", "op_supports"]

# Storage dtypes each device's kernels take (the CPU library is fp32 only).
_DTYPES = {
    "cpu": (torch.float32,),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def op_supports(x: Tensor) -> bool:
    """Whether the custom op runs ``x``'s device and dtype (else the caller keeps eager)."""
    return x.dtype in _DTYPES.get(x.device.type, ())


def _params(tau: float, v_threshold: float, v_reset: Optional[float], decay_input: bool,
            detach_reset: bool, surrogate: str, alpha: float) -> LIFParams:  # fmt: skip
    return LIFParams(tau=tau, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input,
                     detach_reset=detach_reset, surrogate=surrogate, alpha=alpha)  # fmt: skip


def _launcher(device: torch.device):  # type: ignore[no-untyped-def]
    if device.type == "cpu":
        from mixersnn.kernels.cpu import _CpuLauncher

        return _CpuLauncher
    if device.type == "cuda":
        from mixersnn.kernels.cupy_backend import _CupyLauncher

        return _CupyLauncher
    raise RuntimeError(f"mixersnn::lif_forward runs on CPU and CUDA tensors, got {device}")


def _check(x: Tensor) -> None:
    if not op_supports(x):
        raise RuntimeError(
            f"mixersnn::lif ops take {[str(d) for d in _DTYPES.get(x.device.type, ())]} tensors on "
            f"{x.device.type}, got {x.dtype}; the LIF module uses the eager backend for other dtypes"
        )


@torch.library.custom_op("mixersnn::lif_forward", mutates_args=())
def lif_forward(x: Tensor, tau: float, v_threshold: float, v_reset: Optional[float], decay_input: bool,
                detach_reset: bool, surrogate: str, alpha: float, save: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Multi-step LIF from rest: ``x [T, ...]`` -> ``(spikes [T, ...], u [T, ...] or [0])``."""
    _check(x)
    p = _params(tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha)
    launcher = _launcher(x.device)
    x = x.contiguous()
    steps, n = x.shape[0], x[0].numel()
    spikes = launcher.empty(x)
    u = launcher.empty(x) if save else x.new_empty(0)
    if n > 0:
        launcher.forward(p, x, None, spikes, u if save else None, None, n, steps)
    return spikes, u


@lif_forward.register_fake
def _(x: Tensor, tau: float, v_threshold: float, v_reset: Optional[float], decay_input: bool,
      detach_reset: bool, surrogate: str, alpha: float, save: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    spikes = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    u = torch.empty(x.shape, dtype=x.dtype, device=x.device) if save else x.new_empty(0)
    return spikes, u


@torch.library.custom_op("mixersnn::lif_backward", mutates_args=())
def lif_backward(u: Tensor, grad_spikes: Tensor, tau: float, v_threshold: float, v_reset: Optional[float],
                 decay_input: bool, detach_reset: bool, surrogate: str, alpha: float) -> Tensor:  # fmt: skip
    """Exact BPTT of :func:`lif_forward` from the saved ``u``: ``grad_x [T, ...]``."""
    _check(u)
    p = _params(tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha)
    launcher = _launcher(u.device)
    u = u.contiguous()
    gs = grad_spikes.to(u.dtype).contiguous()
    steps, n = u.shape[0], u[0].numel()
    grad_x = launcher.empty(u)
    if n > 0:
        launcher.backward(p, u, gs, None, grad_x, None, n, steps)
    return grad_x


@lif_backward.register_fake
def _(u: Tensor, grad_spikes: Tensor, tau: float, v_threshold: float, v_reset: Optional[float],
      decay_input: bool, detach_reset: bool, surrogate: str, alpha: float) -> Tensor:  # fmt: skip
    return torch.empty(u.shape, dtype=u.dtype, device=u.device)


_OPTION_NAMES = ("tau", "v_threshold", "v_reset", "decay_input", "detach_reset", "surrogate", "alpha")


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, *options, save = inputs
    ctx.options = tuple(options)
    ctx.saved = save
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_spikes, grad_u):  # type: ignore[no-untyped-def]
    if not ctx.saved:
        raise RuntimeError(
            "mixersnn::lif_forward was called with save=False (no grad was needed), so it "
            "cannot be differentiated; call it with save=True"
        )
    (u,) = ctx.saved_tensors
    if grad_spikes is None:
        grad_spikes = torch.zeros_like(u)
    grad_x = lif_backward(u, grad_spikes, *ctx.options)
    return (grad_x,) + (None,) * (len(_OPTION_NAMES) + 1)


lif_forward.register_autograd(_backward, setup_context=_setup_context)


def lif_op(x: Tensor, p: LIFParams) -> Tensor:
    """Spikes of the multi-step LIF from rest, through the custom op (what compiled models
    call). ``u`` is stored only when a gradient is needed, as in the eager backends."""
    save = torch.is_grad_enabled() and x.requires_grad
    spikes, _ = torch.ops.mixersnn.lif_forward(
        x, p.tau, p.v_threshold, p.v_reset, p.decay_input, p.detach_reset, p.surrogate, p.alpha, save
    )
    return spikes
