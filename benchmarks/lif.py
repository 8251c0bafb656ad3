"""Fused LIF throughput: forward + backward, every available backend against the reference.

Measured, not asserted. For each device (CPU, and CUDA when present) and dtype this times one
training step of the multi-step LIF core as the models' LIF nodes run it,
``spikes, _ = backend(x, None, v_final=False)`` (from rest, no final membrane kept) then
``backward(spikes, grad)``, as the median of ``--repeats`` runs after ``--warmup`` runs, for
the reference loop ("torch") and every fused backend, in the same process.

The memory floor is measured beside every row: the time of a large copy gives the machine's
copy bandwidth B (bytes read + written per second). On the CPU two copies are timed, torch's
``copy_`` and a copy with non-temporal stores (``mixersnn.kernels.cpu.stream_copy``, which
skips the read-for-ownership a normal store pays); B is the faster, the best this machine
does. A fused step must move at least 24 bytes per element in fp32 (forward reads x, writes
spikes and u; backward reads the spike gradient and u, writes the x gradient), 12 in 16 bits,
so it cannot take less than ``T * N * bytes / B``. "floor" in the table is that bound divided
by the measured time (1.00 = running at copy speed); the JSON also gives it against
``copy_`` alone ("fraction_of_copy_floor"). The copies run in the same interleaved rounds as
the row they price (``_common.interleaved_medians``), so a shared machine's drift moves both
alike: measured in separate blocks, the floor ratio of one build swung by 0.1-0.2 between
runs.

Seven rows show the cpu kernels alone: "cpu-kern" on reused buffers of the benchmark's size;
with pool "n+1", the same with one more neuron, so that every row but the first starts off a
cache line (the kernels must lay their chunks on the lines themselves; a first version that
did not ran 2-4x slower there); with pool "cache", the same number of elements as repeated
calls on a size that stays in the last-level cache. If "-" and "cache" agree, the kernels are
bound by arithmetic, not by memory, at that size on this machine. Then each pass alone, so a
change can be placed: "fwd" and "bwd" at the benchmark's size, "fwd cache" and "bwd cache"
cache-resident; each pass must move 12 bytes per element in fp32 (half the step's 24), and
their floors say so. A pass whose "cache" row is below 1.00 cannot reach the memory floor on
this machine however its memory traffic is arranged.

Three "cpu-traf" rows give the other bound: the same memory traffic with no arithmetic
(``mixersnn.kernels.cpu.stream_traffic``: the kernels' tiles, chunks, prefetch and streaming
stores around one add per element), for a whole step and for each pass, timed in the same
rounds as the "cpu-kern" row of the same label. A copy moves two streams; a pass moves three
(one read and two writes forward, two reads and one write backward), and this machine's memory
system may not move three as fast: the traffic row is the most any kernel laid out like these
can do here, and the last line gives the kernels' time over it (1.00x: nothing beyond their
memory traffic).

The neuron is the one the models use (``NeuronConfig``'s defaults, the paper's: tau 2, hard
reset, ``detach_reset``). ``--surrogate`` picks the surrogate gradient the backward pass
computes (default: the paper's sigmoid). The sigmoid's exp and division bind its backward pass
by arithmetic on a 2-core CPU, where atan's do not: compare the two runs' "bwd cache" rows.

    .venv/bin/python benchmarks/lif.py                          # T=4, N=4M, fp32 on CPU
    .venv/bin/python benchmarks/lif.py --steps 8 --numel 1000000 --json out.json
    .venv/bin/python benchmarks/lif.py --surrogate atan         # the cheaper surrogate
    .venv/bin/python benchmarks/lif.py --smoke                  # seconds, for CI

The "cpu" backend is measured twice: with its output pool off ("fresh": each large output is
new memory, page-faulted on first touch) and on ("pool", the default: outputs reuse idle,
already-mapped buffers; ``mixersnn.kernels._alloc``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, interleaved_medians, pool_mode, pool_modes, write_json  # noqa: E402

from mixersnn.kernels.cpu import (  # noqa: E402
    _CpuLauncher,
    cpu_unavailable_reason,
    stream_copy,
    stream_threshold,
    stream_traffic,
)
from mixersnn.neurons import available_backends, make_lif_params  # noqa: E402
from mixersnn.models.config import NeuronConfig  # noqa: E402
from mixersnn.neurons.surrogate import SURROGATES  # noqa: E402
from mixersnn.neurons.backends import resolve_backend  # noqa: E402

_BYTES_PER_ELEMENT = {torch.float32: 24, torch.float16: 12, torch.bfloat16: 12}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Copies:
    """The copies that measure bandwidth: torch's ``copy_`` of ``nbytes`` of fp32 and, on
    the CPU when the kernels load, the same copy with non-temporal stores ("stream")."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.nbytes = nbytes
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        self.fns: dict[str, Callable[[], object]] = {"copy_": lambda: dst.copy_(src)}
        if device.type == "cpu" and cpu_unavailable_reason() is None:
            self.fns["stream"] = lambda: stream_copy(src, dst)


def timed_beside_copies(
    steps: dict[str, Callable[[], object]], copies: Copies, device: torch.device, warmup: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of each of ``steps`` and the copies' bandwidths (bytes read + written
    per second, by kind), all timed in the same interleaved rounds."""
    medians = interleaved_medians({**steps, **copies.fns}, device, warmup, repeats)
    secs = {k: medians.pop(k) for k in steps}
    return secs, {k: 2 * copies.nbytes / t for k, t in medians.items()}


def neuron_options(surrogate: str) -> dict:
    """The neuron as the models configure it (``NeuronConfig``'s defaults, the paper's: hard
    reset, ``detach_reset``), with ``surrogate`` at its default alpha."""
    opts = NeuronConfig(surrogate=surrogate).to_dict()
    del opts["backend"]
    return opts


def backend_step(
    name: str, device: torch.device, dtype: torch.dtype, steps: int, numel: int, surrogate: str
) -> Callable[[], None]:
    """One forward + backward of backend ``name``, called as the models' LIF nodes call it:
    from rest (no initial membrane to read) and without keeping the final membrane."""
    p = make_lif_params(**neuron_options(surrogate))
    x = torch.randn(steps, numel, device=device, dtype=dtype).requires_grad_()
    grad = torch.randn(steps, numel, device=device, dtype=dtype)
    fn = resolve_backend(name, x).fn

    def step() -> None:
        spikes, _ = fn(x, None, p, v_final=False)
        torch.autograd.backward([spikes], [grad])
        x.grad = None

    return step


def run(args: argparse.Namespace) -> dict:
    """Time every usable backend on every device asked for: ``{"meta": ..., "rows": [...]}``."""
    wanted = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in wanted and not torch.cuda.is_available():
        raise SystemExit("--devices cuda: torch sees no CUDA device")
    meta = _meta(args)
    rows = []
    for device in [torch.device(d) for d in wanted]:
        rows += _device_rows(args, device, meta)
    return {"meta": meta, "rows": rows}


def _meta(args: argparse.Namespace) -> dict:
    """The run's settings and machine; the per-device fields are filled as devices are timed."""
    return {
        "steps": args.steps,
        "numel": args.numel,
        "surrogate": args.surrogate,
        "neuron": neuron_options(args.surrogate),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "backends": {},
        "copy_GBps": {},
        "stream_threshold_bytes": None,
    }


def _device_rows(args: argparse.Namespace, device: torch.device, meta: dict) -> list[dict]:
    """The rows of one device, every dtype; records its backends and copy bandwidth in ``meta``."""
    status = available_backends(device.type)
    meta["backends"][device.type] = status
    usable = [b for b, reason in status.items() if reason is None]
    # The reference first: every other row is compared with it.
    usable.sort(key=lambda b: (b != "torch", b))
    copies = Copies(device, args.copy_mib << 20)
    measured: list[dict[str, float]] = []
    if device.type == "cpu" and "cpu" in usable:
        meta["stream_threshold_bytes"] = stream_threshold()
    rows = []
    for dtype_name in args.dtypes or (["float32"] if device.type == "cpu" else list(_DTYPES)):
        rows += _dtype_rows(args, device, dtype_name, usable, copies, measured, meta)
    # For the header: each kind's median over the rows' rounds.
    meta["copy_GBps"][device.type] = {
        k: statistics.median(m[k] for m in measured) / 1e9 for k in copies.fns
    }
    return rows


def _dtype_rows(
    args: argparse.Namespace, device: torch.device, dtype_name: str, usable: list[str], copies: Copies,
    measured: list[dict[str, float]], meta: dict,
) -> list[dict]:  # fmt: skip
    """The rows of one device and dtype: each backend's step (the cpu backend once per pool
    mode), then, after the cpu backend in fp32, the cpu kernels alone. Each timing's copy
    bandwidths are appended to ``measured``."""
    dtype = _DTYPES[dtype_name]
    elements = args.steps * args.numel
    # The output pool is the cpu backend's; other rows run once.
    modes = pool_modes(args.pool)

    def timed(reps: int, **steps: Callable[[], object]) -> tuple[dict[str, float], dict[str, float]]:
        secs, bws = timed_beside_copies(steps, copies, device, args.warmup, reps)
        measured.append(bws)
        return secs, bws

    row = lambda *a, passes=2: _row(device, dtype_name, *a, elements, dtype, passes)  # noqa: E731
    rows = []
    ref_s = None
    for backend in usable:
        for mode in modes if backend == "cpu" else [None]:
            # The reference loop is slow on the CPU: fewer repeats keep the run short.
            reps = max(3, args.repeats // 2) if backend == "torch" else args.repeats
            with pool_mode(mode) as label:
                step = backend_step(backend, device, dtype, args.steps, args.numel, args.surrogate)
                secs, bws = timed(reps, step=step)
                secs = secs["step"]
            if backend == "torch":
                ref_s = secs
            rows.append(row(backend, label, secs, ref_s, bws))
        if backend == "cpu" and dtype == torch.float32:
            kern_rows, meta["kernels_vs_traffic"] = _cpu_kernel_rows(args, timed, row, ref_s)
            rows += kern_rows
    return rows


def _cpu_kernel_rows(
    args: argparse.Namespace, timed: Callable[..., tuple[dict[str, float], dict[str, float]]],
    row: Callable[..., dict], ref_s: float | None,
) -> tuple[list[dict], dict[str, float]]:  # fmt: skip
    """The cpu kernels on preallocated, already-touched buffers, and the same memory traffic
    with no arithmetic; the rows, and each traffic label's kernel time over its traffic time.

    The arithmetic and memory streaming alone, without autograd or output allocation; then the
    same work on a cache-resident size (the arithmetic's own ceiling). A whole step and each
    pass alone are timed beside the same memory traffic with no arithmetic, in the same rounds:
    what any kernel laid out like these can do at most on this machine.
    """
    small = min(args.numel, _IN_CACHE_NUMEL)
    calls = max(1, args.numel // small)
    both, fwd, bwd = ("fwd", "bwd"), ("fwd",), ("bwd",)
    rows = []
    kern_vs_traffic = {}
    for label, numel, calls_, passes in [
        ("-", args.numel, 1, both),
        ("n+1", args.numel + 1, 1, both),
        ("cache", small, calls, both),
        ("fwd", args.numel, 1, fwd),
        ("bwd", args.numel, 1, bwd),
        ("fwd cache", small, calls, fwd),
        ("bwd cache", small, calls, bwd),
    ]:
        steps = {"kern": cpu_kernels_step(args.steps, numel, calls_, args.surrogate, passes)}
        if label in ("-", "fwd", "bwd"):
            steps["traffic"] = cpu_traffic_step(args.steps, numel, passes)
        secs, bws = timed(args.repeats, **steps)
        del steps  # their buffers go before the next row's
        # Per element of the benchmark's size (the cache rows do fewer, n+1
        # one more); the reference ratio only means something for a whole step.
        scale = args.numel / (numel * calls_)
        ref = ref_s if len(passes) == 2 else None
        rows.append(row("cpu-kern", label, secs["kern"] * scale, ref, bws, passes=len(passes)))
        if "traffic" in secs:
            rows.append(row("cpu-traf", label, secs["traffic"], None, bws, passes=len(passes)))
            kern_vs_traffic[label] = secs["kern"] / secs["traffic"]
    return rows, kern_vs_traffic


def _row(
    device: torch.device, dtype_name: str, backend: str, alloc: str, secs: float,
    ref_s: float | None, bws: dict[str, float], elements: int, dtype: torch.dtype, passes: int = 2,
) -> dict:  # fmt: skip
    """One table row; ``passes`` is 2 for forward + backward, 1 for one pass alone (half the
    bytes to move)."""
    nbytes = _BYTES_PER_ELEMENT[dtype] * passes // 2
    floor_s = elements * nbytes / max(bws.values())
    copy_floor_s = elements * nbytes / bws["copy_"]
    return {
        "device": device.type,
        "dtype": dtype_name,
        "backend": backend,
        "pool": alloc,
        "ms": secs * 1e3,
        "Gelem_per_s": elements / secs / 1e9,
        "vs_reference": None if ref_s is None else ref_s / secs,
        "bytes_per_element": nbytes,
        "GBps_moved": elements * nbytes / secs / 1e9,
        "fraction_of_floor": floor_s / secs,
        "fraction_of_copy_floor": copy_floor_s / secs,
        "floor_ms": floor_s * 1e3,
        "copy_GBps": {k: v / 1e9 for k, v in bws.items()},
    }


# T=4 x 64Ki fp32 = 1 MiB per tensor, five tensors: inside a 32 MiB last-level cache with room.
_IN_CACHE_NUMEL = 64 * 1024


def cpu_kernels_step(
    steps: int, numel: int, calls: int, surrogate: str, passes: tuple[str, ...] = ("fwd", "bwd")
) -> Callable[[], None]:
    """``calls`` fp32 kernel launches of each of ``passes`` (forward, backward) on reused
    buffers (``_CpuLauncher``, the backend's own entry points; no autograd, no allocation).
    The backward pass reads what one forward pass wrote before the timing starts. As in the
    models, the forward starts from rest and keeps no final membrane (null v0 and v_final)."""
    p = make_lif_params(**neuron_options(surrogate))
    x, grad = torch.randn(steps, numel), torch.randn(steps, numel)
    spikes, u, grad_x = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
    _CpuLauncher.forward(p, x, None, spikes, u, None, numel, steps)

    def step() -> None:
        for _ in range(calls):
            if "fwd" in passes:
                _CpuLauncher.forward(p, x, None, spikes, u, None, numel, steps)
            if "bwd" in passes:
                _CpuLauncher.backward(p, u, grad, None, grad_x, None, numel, steps)

    return step


def cpu_traffic_step(steps: int, numel: int, passes: tuple[str, ...]) -> Callable[[], None]:
    """``passes``' memory traffic without their arithmetic (``stream_traffic``) on reused
    buffers: the forward's (read one row, write two), the backward's (read two, write one)."""
    x, grad = torch.randn(steps, numel), torch.randn(steps, numel)
    spikes, u, grad_x = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)

    def step() -> None:
        if "fwd" in passes:
            stream_traffic("forward", x, spikes, u)
        if "bwd" in passes:
            stream_traffic("backward", u, grad, grad_x)

    return step


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(
        f"LIF forward+backward, T={meta['steps']}, N={meta['numel']:,}, {meta['surrogate']} surrogate "
        f"(torch {meta['torch']}, {meta['threads']} CPU threads)"
    )
    for dev, gbps in meta["copy_GBps"].items():
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in gbps.items())
        print(f"  {dev}: copy bandwidth (read + write, GB/s, median over the rows): {kinds}; "
              "each row's floor uses the faster, timed in its own rounds")
    if meta.get("stream_threshold_bytes") is not None:
        print(f"  cpu: outputs of calls writing >= {meta['stream_threshold_bytes'] >> 20} MiB use "
              "non-temporal stores (the last-level cache size)")
    for dev, status in meta["backends"].items():
        for b, reason in status.items():
            if reason is not None:
                print(f"  {dev}: backend {b!r} skipped: {reason}")
    header = f"{'device':6} {'dtype':9} {'backend':8} {'pool':9} {'ms':>9} {'Gelem/s':>8} {'vs ref':>7} {'GB/s':>7} {'floor':>6} {'floor ms':>9}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        ratio = "" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}x"
        print(
            f"{r['device']:6} {r['dtype']:9} {r['backend']:8} {r['pool']:9} {r['ms']:9.2f} "
            f"{r['Gelem_per_s']:8.3f} {ratio:>7} {r['GBps_moved']:7.1f} "
            f"{r['fraction_of_floor']:6.2f} {r['floor_ms']:9.2f}"
        )
    print(
        "floor = (bytes a fused step must move / copy bandwidth) / measured time; "
        "1.00 runs at copy speed. vs ref = reference time / this time.\n"
        "pool: the cpu backend's output pool off (fresh: every large output is new memory, "
        "page-faulted on first touch) or on (pool, the default: idle buffers are reused).\n"
        "cpu-kern = the cpu backend's kernels alone on reused buffers (no autograd); pool "
        "'n+1': one more neuron (rows off cache-line alignment); 'cache': the same elements as "
        "calls on a cache-resident size (the arithmetic's ceiling); 'fwd', 'bwd': one pass "
        "alone (its floor: 12 bytes per element in fp32), 'cache' as above.\n"
        "cpu-traf = the same memory traffic with no arithmetic (the kernels' layout and stores, "
        "one add per element): the most a kernel moving these bytes can do on this machine; "
        "'-' a whole step, 'fwd', 'bwd' one pass."
    )
    ratio = meta.get("kernels_vs_traffic")
    if ratio:
        print(f"cpu-kern time / cpu-traf time: step {ratio['-']:.2f}x, fwd {ratio['fwd']:.2f}x, "
              f"bwd {ratio['bwd']:.2f}x (1.00x: the kernels cost nothing beyond their memory traffic)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="time steps T (default 4)")
    ap.add_argument("--numel", type=int, default=4 * 1024 * 1024, help="neurons N (default 4M)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs; the median is shown")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    ap.add_argument(
        "--dtypes", nargs="+", choices=list(_DTYPES), default=None,
        help="default: float32 on CPU; float32, float16, bfloat16 on CUDA",
    )  # fmt: skip
    ap.add_argument("--copy-mib", type=int, default=512, help="size of the copy that measures bandwidth")
    ap.add_argument(
        "--devices", nargs="+", choices=["cpu", "cuda"], default=None,
        help="default: cpu, plus cuda when present",
    )  # fmt: skip
    ap.add_argument(
        "--surrogate", choices=sorted(SURROGATES), default=NeuronConfig().surrogate,
        help=f"surrogate gradient of the backward pass (default {NeuronConfig().surrogate}, the models')",
    )  # fmt: skip
    add_common_args(ap, smoke_help="tiny sizes, one repeat (CI)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.numel, args.repeats, args.warmup, args.copy_mib = 4096, 1, 1, 8
    result = run(args)
    print_table(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
