"""Output allocation for the CPU kernels: ``torch.empty`` plus a transparent-huge-page hint.

A [T, N] output of 64 MiB is above glibc's largest mmap threshold (32 MiB), so every call
gets fresh pages from the kernel and pays one page fault per 4 KiB on first touch, and an
munmap on free. Measured here (a VM), that cost ~140 ms per 64 MiB, more than the kernel
itself. ``madvise(MADV_HUGEPAGE)`` on such a buffer before it is touched lets Linux back it
with 2 MiB pages (when THP is in "madvise" or "always" mode): ~5x cheaper first touch and a
near-free munmap. The hint only changes page size, never contents; it is skipped for small
buffers (heap memory that glibc reuses) and off Linux.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Optional

import torch

__all__ = ["empty_like_large"]

_MADV_HUGEPAGE = 14
_PAGE = 4096
# glibc serves allocations above DEFAULT_MMAP_THRESHOLD_MAX (32 MiB on 64-bit) with their own
# mmap, so the advised range belongs to this tensor alone.
_MIN_BYTES = 32 * 1024 * 1024

_madvise: Optional[ctypes._CFuncPtr] = None  # type: ignore[name-defined]
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


def empty_like_large(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)`` (contiguous), with a huge-page hint when it is large.

    Args:
        t: any CPU tensor; the result has its shape and dtype.
    """
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if _madvise is not None and out.is_cpu and out.numel() * out.element_size() >= _MIN_BYTES:
        start = (out.data_ptr() + _PAGE - 1) & ~(_PAGE - 1)
        end = (out.data_ptr() + out.nbytes) & ~(_PAGE - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: failure changes nothing
    return out
