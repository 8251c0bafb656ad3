"""Event-driven synapses: a linear layer over spikes that does work per spike, not per input.

Every channel-mixing Linear and fusing 1x1 conv of the model reads spikes; at the firing
rates these models run at (2-11% at initialisation, see docs/benchmarks.md) a dense GEMM
spends most of its multiplies on zeros. :func:`spike_linear` is ``F.linear`` that, on CPU fp32
tensors with the cpu kernel library loaded, lists the input's nonzeros once and computes the
output and the weight gradient from them alone (``spike_mm.cpp``); the input's gradient,
``grad_y @ W``, is dense and stays with the BLAS. Any values are accepted and give the same
result as ``F.linear`` up to fp32 summation order; the input only has to be sparse to pay.

Where it does not apply it *is* ``F.linear``: CUDA tensors (cuBLAS on dense tensors is the
faster GPU path), other dtypes, CPU autocast, inputs that are not contiguous, layers smaller
than :data:`MIN_MACS` multiply-adds, and inputs denser than :data:`MAX_DENSITY`. Under
``torch.compile`` the kernels are the custom ops ``mixersnn::spike_linear`` and
``mixersnn::spike_linear_weight_grad`` (fake and autograd rules registered), one node each in
the graph.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MAX_DENSITY",
    "MIN_MACS",
    "FORWARD_MIN_ROWS",
    "spike_linear",
    "sparse_linear_available",
    "SpikeLinear",
    "set_event_driven",
]

#: Above this fraction of nonzeros the dense GEMM is used: at 0.3 the sparse weight gradient
#: is already slower than the BLAS on this project's 2-core EPYC (docs/benchmarks.md).
MAX_DENSITY = 0.25

#: Below this many multiply-adds (M * K * N) the dense GEMM is used: listing the nonzeros and
#: the extra calls cost some 40 us, which a layer this small does not earn back
#: (break-even measured at 4-7 million; every layer of the paper's models is above this).
MIN_MACS = 1 << 23

#: With fewer rows than this the forward product is the BLAS's (the weight gradient stays
#: event-driven): transposing W costs what the whole dense product does when it has so few
#: rows (32 rows: 0.7-0.9x the dense time; 128 rows: 1.5-2.3x faster; docs/benchmarks.md).
FORWARD_MIN_ROWS = 64


def sparse_linear_available() -> bool:
    """Whether the kernels load here (builds the cpu library once if needed). Never raises."""
    from mixersnn.kernels.cpu import cpu_unavailable_reason

    return cpu_unavailable_reason() is None


def _eligible(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether the kernels apply: known from dtypes, devices, shapes and layout alone (so a
    compiled graph decides it once); the input's density is decided at run time."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if x.dim() < 2 or x.shape[-1] != weight.shape[-1] or x.numel() * weight.shape[0] < MIN_MACS:
        return False  # (a shape mismatch is left to F.linear's error)
    if x.numel() >= 2**31 or not x.is_contiguous():
        return False  # (the nonzero lists index with int32)
    if torch.is_autocast_enabled("cpu"):
        return False
    return sparse_linear_available()


_LIB: list = []  # the loaded library's ctypes handle, once found


def _lib():  # type: ignore[no-untyped-def]
    if not _LIB:
        from mixersnn.kernels.cpu import load_library

        _LIB.append(load_library().lib)
    return _LIB[0]


# ----------------------------------------------------------------------------- kernel calls
# What the eager autograd.Function and the custom ops (torch.compile) share: x is [M, K]
# contiguous fp32, weight [N, K].
def _nonzeros(x: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(row_ptr [M + 1], cols [nnz]) listing the nonzeros of ``x`` row by row, or None when
    more than :data:`MAX_DENSITY` of it is nonzero (the dense GEMM is then faster)."""
    M, K = x.shape
    lib = _lib()
    threads = torch.get_num_threads()
    row_ptr = torch.empty(M + 1, dtype=torch.int32)
    nnz = lib.spk_count(x.data_ptr(), M, K, row_ptr.data_ptr(), threads)
    if nnz > MAX_DENSITY * M * K:
        return None
    cols = torch.empty(max(nnz, 1), dtype=torch.int32)
    scratch = torch.empty(threads * (K + 16), dtype=torch.int32)
    lib.spk_fill(x.data_ptr(), M, K, row_ptr.data_ptr(), cols.data_ptr(), scratch.data_ptr(), threads)
    return row_ptr, cols


def _forward(x: Tensor, w: Tensor, b: Optional[Tensor], row_ptr: Tensor, cols: Tensor) -> Tensor:
    M, K = x.shape
    N = w.shape[0]
    w = w.contiguous()
    b = None if b is None else b.contiguous()
    if M < FORWARD_MIN_ROWS:
        return x @ w.t() if b is None else torch.addmm(b, x, w.t())
    y = x.new_empty(M, N)
    scratch = x.new_empty(-(-N // 64) * (K + 1) * 64)
    _lib().spk_linear_fwd(x.data_ptr(), row_ptr.data_ptr(), cols.data_ptr(), w.data_ptr(),
                          None if b is None else b.data_ptr(), y.data_ptr(), scratch.data_ptr(),
                          M, K, N, torch.get_num_threads())  # fmt: skip
    return y


def _weight_grad(x: Tensor, gy: Tensor, row_ptr: Tensor, cols: Tensor) -> Tensor:
    """``gy^T @ x`` from the nonzeros of ``x``; ``gy`` [M, N] contiguous."""
    M, K = x.shape
    N = gy.shape[1]
    threads = torch.get_num_threads()
    lib = _lib()
    grad_w = x.new_empty(N, K)
    scratch = x.new_empty(lib.spk_wgrad_scratch(M, K, N, threads))
    lib.spk_linear_wgrad(x.data_ptr(), row_ptr.data_ptr(), cols.data_ptr(), gy.data_ptr(),
                         grad_w.data_ptr(), scratch.data_ptr(), M, K, N, threads)  # fmt: skip
    return grad_w


class _SpikeLinearFn(torch.autograd.Function):
    """Eager: ``y = x @ W^T + b`` from the nonzeros of ``x`` (``[M, K]``, listed in
    ``row_ptr``/``cols``, which are kept for the weight gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], row_ptr: Tensor,  # type: ignore[override]
                cols: Tensor) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight, row_ptr, cols)
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias, row_ptr, cols)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, w, row_ptr, cols = ctx.saved_tensors
        gy = grad_y.contiguous()
        grad_x = gy @ w if ctx.needs_input_grad[0] else None
        grad_w = _weight_grad(x, gy, row_ptr, cols) if ctx.needs_input_grad[1] else None
        grad_b = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


# ----------------------------------------------------------------------------- torch.compile
# The same kernels as custom ops, so a compiled graph keeps them: one opaque node forward, one
# for the weight gradient (which lists the nonzeros again: a few microseconds, and no
# data-dependent shapes between ops). Each decides on the density itself.
@torch.library.custom_op("mixersnn::spike_linear", mutates_args=())
def spike_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear`` of ``x [M, K]`` (contiguous fp32 CPU) from its nonzeros: ``[M, N]``."""
    nz = _nonzeros(x)
    return F.linear(x, weight, bias) if nz is None else _forward(x, weight, bias, *nz)


@spike_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("mixersnn::spike_linear_weight_grad", mutates_args=())
def spike_linear_weight_grad(x: Tensor, grad_y: Tensor) -> Tensor:
    """``grad_y^T @ x`` (``[N, K]``) from the nonzeros of ``x [M, K]``."""
    gy = grad_y.contiguous()
    nz = _nonzeros(x)
    return gy.t() @ x if nz is None else _weight_grad(x, gy, *nz)


@spike_linear_weight_grad.register_fake
def _(x: Tensor, grad_y: Tensor) -> Tensor:
    return x.new_empty(grad_y.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_y):  # type: ignore[no-untyped-def]
    x, weight = ctx.saved_tensors
    grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
    grad_w = torch.ops.mixersnn.spike_linear_weight_grad(x, grad_y) if ctx.needs_input_grad[1] else None
    grad_b = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


spike_linear_op.register_autograd(_backward, setup_context=_setup_context)


def spike_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, computed from the nonzeros of ``x`` where that applies
    (see the module docstring) and its density is at most :data:`MAX_DENSITY`.

    Under ``torch.compile`` the kernels run as the ``mixersnn::spike_linear`` custom op.

    Args:
        x: ``[..., K]`` input, typically spikes.
        weight: ``[N, K]``.
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]``, as ``F.linear``.
    """
    if not _eligible(x, weight, bias):
        return F.linear(x, weight, bias)
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.view(-1, K)
    if torch.compiler.is_compiling():
        return torch.ops.mixersnn.spike_linear(x2, weight, bias).view(*x.shape[:-1], N)
    nz = _nonzeros(x2)
    if nz is None:
        return F.linear(x, weight, bias)
    return _SpikeLinearFn.apply(x2, weight, bias, *nz).view(*x.shape[:-1], N)


class SpikeLinear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and state-dict keys) whose forward is
    :func:`spike_linear` while ``event_driven`` is True (the default), ``F.linear`` otherwise.

    The model turns ``event_driven`` off for the plain-torch reference backend
    (``backend="torch"``), so the reference stays pure torch.
    """

    event_driven: bool = True

    def forward(self, x: Tensor) -> Tensor:
        if self.event_driven:
            return spike_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def set_event_driven(model: nn.Module, on: bool) -> int:
    """Set ``event_driven`` on every submodule of ``model`` that has it (:class:`SpikeLinear`,
    ``PointwiseConv2d``); returns how many. Off, they compute exactly what ``F.linear`` does."""
    count = 0
    for mod in model.modules():
        if hasattr(type(mod), "event_driven"):
            mod.event_driven = bool(on)
            count += 1
    return count
