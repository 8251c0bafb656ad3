"""The "cupy" LIF backend: lif.cu compiled by NVRTC through CuPy, on torch's CUDA stream.

Each (dtype, option set) compiles once into a ``cupy.RawModule`` (CuPy also caches the cubin on
disk). Tensors cross to CuPy by DLPack; 16-bit tensors are viewed as int16 first because
CuPy has no bfloat16 dtype and the kernels only need the pointer.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch

from mixersnn.kernels._function import require_device, run_fused
from mixersnn.kernels.source import (KernelVariant, backward_variant, backward_variants, forward_variant,
                                     forward_variants, kernel_source)
from mixersnn.neurons.backends import LIFParams

__all__ = [
    "cuda_include_dir",
    "nvrtc_options",
    "nvrtc_compile",
    "cupy_unavailable_reason",
    "lif_cupy",
]

_THREADS = 256
_LANES = 4  # must match LIF_LANES for CUDA in lif_shim.h
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def cuda_include_dir() -> Optional[Path]:
    """The directory holding ``cuda_fp16.h``/``cuda_bf16.h`` for NVRTC, or ``None``.

    Looks in the ``nvidia-cuda-runtime-cu12`` wheel first (what pip users have), then
    ``$CUDA_PATH``/``$CUDA_HOME``/``/usr/local/cuda``.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(p) / "include" for p in (spec.submodule_search_locations or [])]
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_bf16.h").is_file():
            return c
    return None


def nvrtc_options(arch: Optional[str] = None) -> tuple[str, ...]:
    """NVRTC flags for lif.cu.

    ``--fmad=false`` keeps the charge step free of fused multiply-adds so spikes match the
    torch reference bit for bit.

    Args:
        arch: e.g. "sm_90"; ``None`` lets CuPy choose the current device's.
    """
    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError(
            "cuda_fp16.h/cuda_bf16.h not found; pip install nvidia-cuda-runtime-cu12 "
            "(the 'gpu' extra) or set CUDA_PATH to a CUDA toolkit"
        )
    opts = ["--std=c++17", "--fmad=false", f"-I{inc}"]
    if arch is not None:
        opts.append(f"--gpu-architecture={arch}")
    return tuple(opts)


def nvrtc_compile(variants: list[KernelVariant], arch: str) -> tuple[bytes, dict[str, str]]:
    """Compile ``variants`` to a cubin with NVRTC alone (no device needed).

    Args:
        variants: kernel instantiations to compile.
        arch: real architecture, e.g. "sm_80".

    Returns:
        ``(cubin, {template_name: lowered (mangled) name})``.

    Raises:
        RuntimeError: with NVRTC's log when compilation fails.
    """
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(kernel_source("cuda"), "lif.cu", [], [])
    try:
        for v in variants:
            nvrtc.addNameExpression(prog, v.template_name)
        try:
            nvrtc.compileProgram(prog, list(nvrtc_options(arch)))
        except nvrtc.NVRTCError as err:
            raise RuntimeError(f"NVRTC failed for {arch}: {err}\n{nvrtc.getProgramLog(prog)}")
        lowered = {v.template_name: nvrtc.getLoweredName(prog, v.template_name) for v in variants}
        return nvrtc.getCUBIN(prog), lowered
    finally:
        nvrtc.destroyProgram(prog)


_STATUS: list[Optional[str]] = []


def cupy_unavailable_reason() -> Optional[str]:
    """``None`` when the cupy backend can run, else why not. Never raises."""
    if _STATUS:
        return _STATUS[0]
    reason: Optional[str] = None
    try:
        import cupy  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken install is a reason too
        reason = f"CuPy is not importable ({err}); pip install 'mixersnn[gpu]' (cupy-cuda12x)"
    if reason is None and not torch.cuda.is_available():
        reason = "there is no CUDA device (torch.cuda.is_available() is False)"
    if reason is None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                reason = "CuPy sees no CUDA device"
        except Exception as err:  # noqa: BLE001
            reason = f"CuPy cannot reach a CUDA device ({err})"
    if reason is None and cuda_include_dir() is None:
        reason = (
            "cuda_fp16.h/cuda_bf16.h not found for NVRTC; pip install "
            "nvidia-cuda-runtime-cu12 or set CUDA_PATH"
        )
    _STATUS.append(reason)
    return reason


@lru_cache(maxsize=None)
def _module(dtype: str) -> Any:
    """One ``cupy.RawModule`` per storage dtype holding every option set's kernels.

    A handful of NVRTC runs (the fp16/bf16 headers are parsed once per module) instead of one
    per option set; CuPy compiles on first use and caches the cubin on disk.
    """
    import cupy

    variants = forward_variants((dtype,)) + backward_variants((dtype,))
    return cupy.RawModule(
        code=kernel_source("cuda"),
        options=nvrtc_options(),
        name_expressions=[v.template_name for v in variants],
    )


@lru_cache(maxsize=None)
def _kernel(variant: KernelVariant) -> Any:
    """The compiled ``cupy.RawKernel`` for one instantiation."""
    return _module(variant.dtype).get_function(variant.template_name)


def _as_cupy(t: Optional[torch.Tensor]) -> Any:
    import cupy
    import numpy

    if t is None:
        return numpy.uint64(0)  # a null pointer argument
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return cupy.from_dlpack(t)


def _cupy_stream(stream: torch.cuda.Stream, device_index: int) -> Any:
    """Wrap torch's stream for CuPy: the CUDA stream protocol where both sides have it
    (CuPy >= 14 deprecates ExternalStream), else the raw handle."""
    import warnings

    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(stream, "__cuda_stream__"):
        return from_external(stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(stream.cuda_stream, device_index)


def _launch(variant: KernelVariant, n: int, device: torch.device, args: tuple) -> None:
    """Run one kernel on torch's current stream; tensors (or None = null) go by DLPack."""
    import cupy

    # One block covers _THREADS * _LANES elements; the kernel's tile loop is grid-stride, so
    # capping the grid only matters past 2^31 blocks.
    blocks = max(1, min(-(-n // (_THREADS * _LANES)), 2**31 - 1))
    kernel = _kernel(variant)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index), _cupy_stream(torch.cuda.current_stream(device), index):
        # Converted inside the stream context, so DLPack's producer/consumer streams are the
        # same and torch inserts no extra synchronisation.
        cargs = tuple(_as_cupy(a) if a is None or isinstance(a, torch.Tensor) else a for a in args)
        kernel((blocks,), (_THREADS,), cargs)


class _CupyLauncher:
    """``lif.cu`` through NVRTC/CuPy on torch's current stream; outputs from torch's caching
    allocator."""

    @staticmethod
    def empty(like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like, memory_format=torch.contiguous_format)

    @staticmethod
    def forward(p: LIFParams, x: torch.Tensor, v0: Optional[torch.Tensor], spikes: torch.Tensor,
                u_saved: Optional[torch.Tensor], v_final: Optional[torch.Tensor], n: int, steps: int) -> None:  # fmt: skip
        import numpy

        args = (
            x, v0, spikes, u_saved, v_final, numpy.int64(n), numpy.int32(steps),
            numpy.float32(1.0 / p.tau), numpy.float32(p.v_reset_charge),
            numpy.float32(p.v_threshold),
        )  # fmt: skip
        _launch(forward_variant(p, _DTYPE_NAMES[x.dtype], u_saved is not None), n, x.device, args)

    @staticmethod
    def backward(p: LIFParams, u_saved: torch.Tensor, gs: torch.Tensor, gv: Optional[torch.Tensor],
                 grad_x: torch.Tensor, grad_v0: Optional[torch.Tensor], n: int, steps: int) -> None:  # fmt: skip
        import numpy

        args = (
            u_saved, gs, gv, grad_x, grad_v0, numpy.int64(n), numpy.int32(steps),
            numpy.float32(1.0 / p.tau), numpy.float32(p.v_reset_charge),
            numpy.float32(p.v_threshold), numpy.float32(p.alpha),
        )  # fmt: skip
        _launch(backward_variant(p, _DTYPE_NAMES[u_saved.dtype]), n, u_saved.device, args)


def lif_cupy(
    x_seq: torch.Tensor, v0: Optional[torch.Tensor], p: LIFParams, *, v_final: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The "cupy" backend: fused forward and backward on CUDA tensors.

    Args:
        x_seq: input current ``[T, ...]`` on a CUDA device, fp32/fp16/bf16 (fp32 arithmetic
            inside; u is saved in the input dtype). float64 runs the reference loop.
        v0: initial membrane ``[...]``, or None to start from rest, ``p.v_rest`` (v_reset for a
            hard reset, 0 for a soft one; nothing is read).
        p: resolved neuron options.
        v_final: False: the final membrane is not written, and None is returned for it.

    Returns:
        ``(spikes [T, ...], v_final [...] or None)`` in ``x_seq``'s dtype.
    """
    require_device(x_seq, "cupy", "cuda")
    if x_seq.dtype not in _DTYPE_NAMES:
        from mixersnn.neurons.functional import lif_reference_backend

        return lif_reference_backend(x_seq, v0, p, v_final=v_final)
    return run_fused(x_seq, v0, p, _CupyLauncher, v_final)
