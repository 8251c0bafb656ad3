"""Fused LIF kernels: one CUDA source (``lif.cu``) for the "cupy" and "cpu" backends.

Importing this package registers both backends with ``mixersnn.neurons.backends``. It never
raises because g++, CuPy or a GPU is missing: each backend's ``available()`` returns the
reason instead, and asking for that backend by name raises with it.

- "cpu": ``lif.cu`` compiled as host C++ (OpenMP + simd) into a cached shared library.
- "cupy": ``lif.cu`` compiled by NVRTC through CuPy, launched on torch's current stream.

The "cpu" backend takes large outputs from a pool of already-mapped buffers, so they stop
paying first-touch page faults every step (``mixersnn.kernels._alloc``; ``pool_stats()``,
``set_pool_limit()``, ``empty_cache()``); ``keep_heap_pages()`` keeps the smaller ones, which
glibc's heap serves, mapped from step to step (the training loop calls it on the CPU).

``mixersnn.kernels.spike_linear``: the event-driven synapses (a linear layer over spikes that
works per nonzero on the CPU), built into the "cpu" backend's library.
"""

from __future__ import annotations

from mixersnn.kernels._alloc import empty_cache, keep_heap_pages, pool_limit, pool_stats, set_pool_limit
from mixersnn.kernels.cpu import cpu_unavailable_reason, lif_cpu
from mixersnn.kernels.cupy_backend import cupy_unavailable_reason, lif_cupy
from mixersnn.neurons.backends import Backend, register_backend

__all__ = [
    "lif_cpu",
    "lif_cupy",
    "cpu_unavailable_reason",
    "cupy_unavailable_reason",
    "empty_cache",
    "keep_heap_pages",
    "pool_limit",
    "pool_stats",
    "set_pool_limit",
]

register_backend(Backend(name="cpu", fn=lif_cpu, devices=("cpu",), available=cpu_unavailable_reason, priority=10))
register_backend(Backend(name="cupy", fn=lif_cupy, devices=("cuda",), available=cupy_unavailable_reason, priority=10))
