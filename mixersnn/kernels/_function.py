"""The autograd wrapper both fused backends share: what is saved, what is allocated, which
gradients are returned. Each backend supplies only a :class:`Launcher` (how to allocate an
output and how to run the forward and backward kernels on its device)."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from mixersnn.neurons.backends import LIFParams

__all__ = ["Launcher", "FusedLIF", "run_fused", "require_device"]


def require_device(x_seq: torch.Tensor, backend: str, device_type: str) -> None:
    """Raise unless ``x_seq`` lives where ``backend`` runs (naming the fix: backend='auto')."""
    if x_seq.device.type != device_type:
        raise RuntimeError(
            f"backend={backend!r} needs {device_type.upper()} tensors, got device {x_seq.device}; "
            "use backend='auto'"
        )


class Launcher(Protocol):
    """A device's kernel calls. Tensors are contiguous; ``u_saved``/``grad_v0``/``grad_vfinal``
    may be None (not needed / no gradient), which the kernels take as a null pointer."""

    def empty(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor shaped like ``like`` ([steps, n] outputs)."""

    def forward(self, p: LIFParams, x: torch.Tensor, v0: Optional[torch.Tensor], spikes: torch.Tensor,
                u_saved: Optional[torch.Tensor], v_final: Optional[torch.Tensor], n: int, steps: int) -> None:
        """Run ``lif_forward`` (``lif.cu``); ``v0`` None starts from rest (``p.v_rest``, which
        the kernel takes from its v_reset argument), ``v_final`` None is not written."""

    def backward(self, p: LIFParams, u_saved: torch.Tensor, grad_spikes: torch.Tensor,
                 grad_vfinal: Optional[torch.Tensor], grad_x: torch.Tensor,
                 grad_v0: Optional[torch.Tensor], n: int, steps: int) -> None:
        """Run ``lif_backward`` (``lif.cu``)."""


class FusedLIF(torch.autograd.Function):
    """Fused multi-step LIF: forward saves only u = H - v_threshold, backward is exact BPTT.

    ``apply(x_seq, v0, p, save, launcher, keep_v_final)``: ``v0`` must already have ``x_seq``'s
    dtype, or be None (start from rest, ``p.v_rest``, reading nothing; no gradient to return
    for a constant start); with ``save`` False nothing is stored (inference) and backward is
    not possible; with ``keep_v_final`` False the final membrane is neither written nor
    returned (None in its place).
    """

    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, v0: Optional[torch.Tensor], p: LIFParams, save: bool,  # type: ignore[override]
                launcher: Launcher, keep_v_final: bool = True):  # fmt: skip
        x = x_seq.contiguous()
        v = None if v0 is None else v0.contiguous()
        steps, n = x.shape[0], x[0].numel()
        spikes = launcher.empty(x)
        u_saved = launcher.empty(x) if save else None
        v_final = x.new_empty(x.shape[1:]) if keep_v_final else None
        if n > 0:
            launcher.forward(p, x, v, spikes, u_saved, v_final, n, steps)
        ctx.set_materialize_grads(False)
        ctx.p = p
        ctx.launcher = launcher
        if save:
            ctx.save_for_backward(u_saved)
        return spikes, v_final

    @staticmethod
    def backward(ctx, grad_spikes: Optional[torch.Tensor], grad_vfinal: Optional[torch.Tensor]):  # type: ignore[override]
        (u_saved,) = ctx.saved_tensors
        steps, n = u_saved.shape[0], u_saved[0].numel()
        if grad_spikes is None:  # only v_final was used downstream
            grad_spikes = torch.zeros_like(u_saved)
        gs = grad_spikes.to(u_saved.dtype).contiguous()
        gv = None if grad_vfinal is None else grad_vfinal.to(u_saved.dtype).contiguous()
        grad_x = ctx.launcher.empty(u_saved)
        grad_v0 = torch.empty_like(u_saved[0]) if ctx.needs_input_grad[1] else None
        if n > 0:
            ctx.launcher.backward(ctx.p, u_saved, gs, gv, grad_x, grad_v0, n, steps)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_v0, None, None, None, None


def run_fused(x_seq: torch.Tensor, v0: Optional[torch.Tensor], p: LIFParams, launcher: Launcher,
              keep_v_final: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
    """``FusedLIF.apply`` with what must be decided outside it: whether to store u for backward
    (inside ``forward`` grad mode is off and ``needs_input_grad`` ignores ``no_grad``), and v0
    (or None) in ``x_seq``'s dtype. The backends' one way in."""
    save = torch.is_grad_enabled() and (x_seq.requires_grad or (v0 is not None and v0.requires_grad))
    v = None if v0 is None else v0.to(x_seq.dtype)
    return FusedLIF.apply(x_seq, v, p, save, launcher, keep_v_final)
