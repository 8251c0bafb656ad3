"""Output buffers for the CPU kernels: a pool of large, already-mapped buffers.

Fresh memory costs more than the arithmetic here. A [T, N] output of 64 MiB is above glibc's
largest mmap threshold (32 MiB), so every call gets new pages from the kernel: a page fault
and a zero-fill per 4 KiB on first touch, an munmap on free: more time than the LIF kernel
itself takes on such an output (docs/kernels.md).

So large outputs come from a pool, the way PyTorch's CUDA caching allocator serves GPU
memory: a buffer whose last tensor dies goes back to the pool (a ``weakref.finalize`` on the
numpy array the tensor's storage holds) and the next output of that size reuses its mapped
pages. Only the pool's own buffers are recycled, so unlike a process-wide allocator setting
(such as glibc's ``M_MMAP_MAX=0``, which fragments the heap) nothing else in the process
changes.

- Buffers below 32 MiB are plain ``torch.empty``, from glibc's heap. Left to itself glibc
  still maps many of them afresh (its mmap threshold adapts to the sizes it sees freed) and
  returns freed heap to the kernel, so a training step of the small model page-faults
  1,300-2,300 times (3 ms of system time a step); :func:`keep_heap_pages`, which the training
  loop calls, keeps them mapped.
- At most :func:`pool_limit` bytes (default 2 GiB, ``MIXERSNN_CPU_POOL_MB``) of *idle*
  buffers are kept; buffers in use are not counted. :func:`empty_cache` drops the idle ones.
- A new buffer starts on a 2 MiB boundary and gets an ``MADV_HUGEPAGE`` hint before it is
  touched (2 MiB pages where THP is in "madvise" or "always" mode), which makes its one
  first touch cheaper. The alignment also puts every row of a [T, N] output with N a
  multiple of 16 on a cache line, as the kernels' non-temporal stores want.

The tensors are ordinary CPU tensors (``torch.from_numpy`` views), except that they cannot be
resized in place (``resize_``), which the backends' outputs never need.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import weakref
from collections import defaultdict
from typing import Optional

import numpy as np
import torch

__all__ = ["empty_like_large", "empty_cache", "pool_limit", "set_pool_limit", "pool_stats", "keep_heap_pages"]

_MADV_HUGEPAGE = 14
# Buffers start on a huge-page boundary (see the module docstring).
_ALIGN = 2 * 1024 * 1024
# Below this glibc serves allocations from its heap and reuses them: no pool needed.
_MIN_BYTES = 32 * 1024 * 1024

_madvise = None
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


# mallopt parameters (malloc.h) and glibc's largest mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_KEPT: Optional[bool] = None


def keep_heap_pages(trim_threshold_bytes: int = 1 << 30) -> bool:
    """Keep this process's freed host memory mapped for reuse (glibc only; idempotent).

    Two ``mallopt`` settings: allocations below 32 MiB always come from the heap (the mmap
    threshold fixed at glibc's maximum instead of adapting, and remapped, as sizes come and
    go), and up to ``trim_threshold_bytes`` of free memory at the heap's top stays mapped
    instead of going back to the kernel. A training step allocates the same sizes every step,
    so it then reuses mapped pages instead of faulting in and zero-filling new ones. Larger
    allocations are still mapped per call (the cpu backend's pool serves its own). The cost:
    the process keeps its peak heap, as PyTorch's CUDA caching allocator keeps GPU memory.
    ``MIXERSNN_KEEP_HEAP=0`` opts out.

    Returns:
        Whether the settings are in force (False off glibc, or opted out).
    """
    global _KEPT
    if _KEPT is not None:
        return _KEPT
    _KEPT = False
    if os.environ.get("MIXERSNN_KEEP_HEAP", "1").strip() in ("0", "false", "no") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = max(0, min(int(trim_threshold_bytes), 2**31 - 1))
    _KEPT = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
    return _KEPT


def _env_limit() -> int:
    raw = os.environ.get("MIXERSNN_CPU_POOL_MB", "2048")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"MIXERSNN_CPU_POOL_MB={raw!r} must be a number of MiB >= 0 (0 turns the pool off)") from None
    if mb < 0:
        raise ValueError(f"MIXERSNN_CPU_POOL_MB={raw!r} must be >= 0 (0 turns the pool off)")
    return int(mb * 2**20)


_LOCK = threading.Lock()
_IDLE: dict[int, list[np.ndarray]] = defaultdict(list)  # nbytes -> idle buffers
_STATE = {"limit": _env_limit(), "idle_bytes": 0, "hits": 0, "misses": 0}


def pool_limit() -> int:
    """Bytes of idle buffers the pool may keep (0: the pool is off)."""
    return _STATE["limit"]


def set_pool_limit(max_bytes: int) -> int:
    """Set how many bytes of idle buffers the pool keeps (0 turns it off); returns the old
    limit. Idle buffers above the new limit are released at once."""
    if not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes!r} must be an integer >= 0 (0 turns the pool off)")
    with _LOCK:
        old = _STATE["limit"]
        _STATE["limit"] = max_bytes
        _trim_locked()
    return old


def empty_cache() -> None:
    """Release every idle buffer (buffers in use are untouched and return to no pool)."""
    with _LOCK:
        _IDLE.clear()
        _STATE["idle_bytes"] = 0


def pool_stats() -> dict[str, int]:
    """``{"limit", "idle_bytes", "idle_buffers", "hits", "misses"}`` of this process's pool."""
    with _LOCK:
        return {**_STATE, "idle_buffers": sum(len(v) for v in _IDLE.values())}


def _trim_locked() -> None:
    while _STATE["idle_bytes"] > _STATE["limit"] and _IDLE:
        size = max(_IDLE)
        _IDLE[size].pop()
        if not _IDLE[size]:
            del _IDLE[size]
        _STATE["idle_bytes"] -= size


def _give_back(buf: np.ndarray) -> None:
    # Runs when the last tensor over ``buf`` is freed (any thread; the GIL is held).
    with _LOCK:
        if _STATE["idle_bytes"] + buf.nbytes > _STATE["limit"]:
            return  # over the limit: let it go back to the OS
        _IDLE[buf.nbytes].append(buf)
        _STATE["idle_bytes"] += buf.nbytes


def _new_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of fresh memory starting on a 2 MiB boundary (a view into a slightly larger
    allocation, which the view keeps alive), hinted for huge pages before the first touch."""
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    buf = raw[offset : offset + nbytes]
    if _madvise is not None:
        _madvise(buf.ctypes.data, nbytes, _MADV_HUGEPAGE)  # a hint: failure changes nothing
    return buf


def empty_like_large(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor with ``t``'s shape and dtype; large ones come
    from the pool (see the module docstring), small ones from ``torch.empty``.

    Args:
        t: any CPU tensor.
    """
    nbytes = t.numel() * t.element_size()
    if not t.is_cpu or nbytes < _MIN_BYTES:
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    buf: Optional[np.ndarray] = None
    with _LOCK:
        if _STATE["limit"] > 0 and _IDLE.get(nbytes):
            buf = _IDLE[nbytes].pop()
            _STATE["idle_bytes"] -= nbytes
            _STATE["hits"] += 1
        else:
            _STATE["misses"] += 1
    if buf is None:
        buf = _new_buffer(nbytes)
    # The tensor's storage holds ``owner`` (a view of ``buf``); when the storage is freed the
    # view dies and the finaliser hands ``buf`` back. ``buf`` itself stays referenced only by
    # the finaliser (then by the pool), so it is never freed while a tensor uses it.
    owner = buf.view()
    if _STATE["limit"] > 0:
        weakref.finalize(owner, _give_back, buf)
    del buf
    return torch.from_numpy(owner).view(t.dtype).view(t.shape)
