"""Fused LIF kernels: one CUDA source (``lif.cu``) for the "cupy" and "cpu" backends.

Importing this package registers both backends with ``mixersnn.neurons.backends``. It never
raises because g++, CuPy or a GPU is missing: each backend's ``available()`` returns the
reason instead, and asking for that backend by name raises with it.

- "cpu": ``lif.cu`` compiled as host C++ (OpenMP + simd) into a cached shared library.
- "cupy": ``lif.cu`` compiled by NVRTC through CuPy, launched on torch's current stream.
"""

from __future__ import annotations

from mixersnn.kernels.cpu import cpu_unavailable_reason, lif_cpu
from mixersnn.kernels.cupy_backend import cupy_unavailable_reason, lif_cupy
from mixersnn.neurons.backends import Backend, register_backend

__all__ = ["lif_cpu", "lif_cupy", "cpu_unavailable_reason", "cupy_unavailable_reason"]

register_backend(
    Backend(
        name="cpu",
        fn=lif_cpu,
        devices=("cpu",),
        available=cpu_unavailable_reason,
        priority=10,
    )
)
register_backend(
    Backend(
        name="cupy",
        fn=lif_cupy,
        devices=("cuda",),
        available=cupy_unavailable_reason,
        priority=10,
    )
)
