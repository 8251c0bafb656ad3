"""What the benchmarks share: the timing loop and the CPU output-pool setting under test.

Every benchmark measures ratios side by side in one process (these machines are shared and
noisy), so the pieces that make two rows comparable live here once.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# Runnable as scripts from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixersnn.kernels import empty_cache, pool_limit, set_pool_limit  # noqa: E402

# "fresh": every large output of the cpu backend is new memory, page-faulted on first touch;
# "pool": the backend's default, large outputs reuse idle buffers (mixersnn.kernels._alloc).
POOL_MODES = ("fresh", "pool")
_DEFAULT_LIMIT = pool_limit()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def use_pool(mode: str) -> str:
    """Switch the cpu backend's output pool for ``mode`` ("fresh" = off, "pool" = the default
    limit); returns ``mode`` as the table's label. Idle buffers are dropped either way, so
    each mode starts cold and its warm-up runs fill the pool."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode {mode!r} must be one of {POOL_MODES}")
    set_pool_limit(0 if mode == "fresh" else (_DEFAULT_LIMIT or 2**31))
    empty_cache()
    return mode


def pool_modes(choice: str) -> list[str]:
    """The ``--pool`` choice as the modes to run ("both" = fresh, then pool)."""
    return list(POOL_MODES) if choice == "both" else [choice]
