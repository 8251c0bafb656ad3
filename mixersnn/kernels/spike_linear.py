"""Event-driven synapses: a linear layer over spikes that does work per spike, not per input.

Every channel-mixing Linear and fusing 1x1 conv of the model reads spikes; at the firing
rates these models run at (4-13% at initialisation, see docs/benchmarks.md) a dense GEMM
spends most of its multiplies on zeros. :func:`spike_linear` is ``F.linear`` that, on CPU fp32
tensors with the cpu kernel library loaded, lists the input's nonzeros once and computes the
output and the weight gradient from them alone (``spike_mm.cpp``); the input's gradient,
``grad_y @ W``, is dense and stays with the BLAS. Any values are accepted and give the same
result as ``F.linear`` up to fp32 summation order; the input only has to be sparse to pay.

Where it does not apply it *is* ``F.linear``: CUDA tensors (cuBLAS on dense tensors is the
faster GPU path), other dtypes, CPU autocast, tracing by ``torch.compile`` (Inductor then sees
a plain linear), inputs that are not contiguous, layers smaller than :data:`MIN_MACS`
multiply-adds, and inputs denser than :data:`MAX_DENSITY`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MAX_DENSITY", "MIN_MACS", "FORWARD_MIN_ROWS", "spike_linear", "sparse_linear_available", "SpikeLinear", "set_event_driven"]

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
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if x.dim() < 2 or x.numel() == 0 or x.numel() >= 2**31 or not x.is_contiguous():
        return False  # (the nonzero lists index with int32)
    if torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return sparse_linear_available()


_LIB: list = []  # the loaded library's ctypes handle, once found


def _lib():  # type: ignore[no-untyped-def]
    if not _LIB:
        from mixersnn.kernels.cpu import load_library

        _LIB.append(load_library().lib)
    return _LIB[0]


class _SpikeLinearFn(torch.autograd.Function):
    """``y = x @ W^T + b`` from the nonzeros of ``x`` (``[M, K]``, listed in ``row_ptr``/``cols``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], row_ptr: Tensor,  # type: ignore[override]
                cols: Tensor) -> Tensor:  # fmt: skip
        M, K = x.shape
        N = weight.shape[0]
        w = weight.contiguous()
        b = None if bias is None else bias.contiguous()
        if M < FORWARD_MIN_ROWS:
            y = x @ w.t() if b is None else torch.addmm(b, x, w.t())
        else:
            y = x.new_empty(M, N)
            scratch = x.new_empty(-(-N // 64) * (K + 1) * 64)
            _lib().spk_linear_fwd(x.data_ptr(), row_ptr.data_ptr(), cols.data_ptr(), w.data_ptr(),
                                  None if b is None else b.data_ptr(), y.data_ptr(), scratch.data_ptr(),
                                  M, K, N, torch.get_num_threads())  # fmt: skip
        ctx.save_for_backward(x, w, row_ptr, cols)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, w, row_ptr, cols = ctx.saved_tensors
        gy = grad_y.contiguous()
        grad_x = gy @ w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            M, K = x.shape
            N = w.shape[0]
            threads = torch.get_num_threads()
            grad_w = torch.empty_like(w)
            lib = _lib()
            scratch = x.new_empty(lib.spk_wgrad_scratch(M, K, N, threads))
            lib.spk_linear_wgrad(x.data_ptr(), row_ptr.data_ptr(), cols.data_ptr(), gy.data_ptr(),
                                 grad_w.data_ptr(), scratch.data_ptr(), M, K, N, threads)  # fmt: skip
        grad_b = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def spike_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``, computed from the nonzeros of ``x`` where that applies
    (see the module docstring) and its density is at most :data:`MAX_DENSITY`.

    Args:
        x: ``[..., K]`` input, typically spikes.
        weight: ``[N, K]``.
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]``, as ``F.linear``.
    """
    if (not _eligible(x, weight, bias) or x.shape[-1] != weight.shape[-1]
            or x.numel() * weight.shape[0] < MIN_MACS):  # fmt: skip
        return F.linear(x, weight, bias)  # (a shape mismatch raises F.linear's error)
    K = x.shape[-1]
    x2 = x.view(-1, K)
    M = x2.shape[0]
    lib = _lib()
    threads = torch.get_num_threads()
    row_ptr = torch.empty(M + 1, dtype=torch.int32)
    nnz = lib.spk_count(x2.data_ptr(), M, K, row_ptr.data_ptr(), threads)
    if nnz > MAX_DENSITY * M * K:
        return F.linear(x, weight, bias)
    cols = torch.empty(max(nnz, 1), dtype=torch.int32)
    scratch = torch.empty(threads * (K + 16), dtype=torch.int32)
    lib.spk_fill(x2.data_ptr(), M, K, row_ptr.data_ptr(), cols.data_ptr(), scratch.data_ptr(), threads)
    y = _SpikeLinearFn.apply(x2, weight, bias, row_ptr, cols)
    return y.view(*x.shape[:-1], weight.shape[0])


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
