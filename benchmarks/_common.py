"""What the benchmarks share: the timing loop and the CPU output-pool setting under test.

Every benchmark measures ratios side by side in one process (these machines are shared and
noisy), so the pieces that make two rows comparable live here once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

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
    return interleaved_medians({"fn": fn}, device, warmup, repeats)["fn"]


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median wall time of each of ``fns``, timed in rounds that run each once (the order
    rotating from round to round), after ``warmup`` untimed runs of each.

    On a shared machine whose speed drifts over seconds, back-to-back blocks of one function
    and then the other can differ by tens of percent from load alone; interleaving exposes
    every function to the same drift, so their ratio is what the code changes.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextmanager
def pool_mode(mode: Optional[str]) -> Iterator[str]:
    """Run the block with the cpu backend's output pool off (``"fresh"``) or at its default
    limit (``"pool"``); ``None`` leaves it alone (rows of other backends). Yields the table's
    label ("-" for None). Idle buffers are dropped on entry, so each mode starts cold and its
    warm-up runs fill the pool; the previous limit is restored on exit."""
    if mode is None:
        yield "-"
        return
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode {mode!r} must be one of {POOL_MODES}")
    before = pool_limit()
    set_pool_limit(0 if mode == "fresh" else (_DEFAULT_LIMIT or 2**31))
    empty_cache()
    try:
        yield mode
    finally:
        set_pool_limit(before)
        empty_cache()


def add_common_args(ap: argparse.ArgumentParser, *, smoke_help: str) -> None:
    """The flags the kernel benchmarks share: ``--pool``, ``--smoke`` and ``--json``."""
    ap.add_argument(
        "--pool", choices=["both", *POOL_MODES], default="both",
        help="the cpu backend's output pool: off (fresh), on (pool, the default), or both side by side",
    )  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")


def pool_modes(choice: str) -> list[str]:
    """The ``--pool`` choice as the modes to run ("both" = fresh, then pool)."""
    return list(POOL_MODES) if choice == "both" else [choice]


def write_json(path: Optional[Path], result: object) -> None:
    """Write a benchmark's result as indented JSON (``--json PATH``; None: nothing)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
