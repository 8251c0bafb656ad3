"""The "cpu" LIF backend: lif.cu compiled as host C++ (OpenMP + simd) and called via ctypes.

The same library carries the event-driven synapse kernels (``spike_mm.cpp``, see
:mod:`mixersnn.kernels.spike_linear`).

The shared library is built once per (source, flags, compiler, CPU) and cached at
``${MIXERSNN_CACHE:-~/.cache/mixersnn}/kernels/lif_cpu_<hash>.so``. It is written to a temporary
file in the same directory and moved into place with ``os.replace``, so a concurrent process
sees either no file or a complete one. A cached file that does not load, or whose embedded
build id is not the expected one, is rebuilt rather than trusted.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch

from mixersnn._atomic import atomic_path
from mixersnn.kernels._alloc import empty_like_large
from mixersnn.kernels._function import require_device, run_fused
from mixersnn.kernels.source import backward_variant, backward_variants, forward_variant, forward_variants, kernel_source
from mixersnn.neurons.backends import LIFParams
from mixersnn.neurons.functional import lif_reference_backend

__all__ = [
    "CpuLibrary",
    "cache_dir",
    "load_library",
    "cpu_unavailable_reason",
    "lif_cpu",
    "last_level_cache_bytes",
    "stream_threshold",
    "set_stream_threshold",
]

#: Host-only C++ appended to the build: the event-driven synapses (``spike_linear.py``).
SPIKE_MM_SOURCE = Path(__file__).resolve().parent / "spike_mm.cpp"

# -ffp-contract=off: no fused multiply-add, so the charge step rounds exactly like the torch
# reference and spikes match bit for bit. -fno-math-errno lets the compiler treat math calls
# as pure; -fno-trapping-math lets the vectoriser if-convert selects (FP exceptions are never
# enabled here); neither changes a result. No -ffast-math: it would reorder the forward
# arithmetic.
_BASE_FLAGS: tuple[str, ...] = (
    "-O3",
    "-std=c++17",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
)


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def _arch_flags() -> tuple[str, ...]:
    # -march=native ties the binary to this CPU; the cache key includes the CPU identity.
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        return ("-march=native",)
    return ()


def _cpu_identity() -> str:
    """CPU model and feature flags: what -march=native compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = []
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features", "CPU part") and line not in keep:
            keep.append(line)
    return "\n".join(keep) or platform.machine()


def cache_dir() -> Path:
    """``${MIXERSNN_CACHE:-~/.cache/mixersnn}/kernels`` (read at call time, so tests can move it)."""
    root = os.environ.get("MIXERSNN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mixersnn"
    )
    return Path(root) / "kernels"


@dataclass
class CpuLibrary:
    """A loaded kernel library.

    Attributes:
        lib: the ctypes handle.
        path: the cached ``.so``.
        build_id: hash of source, flags, compiler and CPU (also embedded in the library).
        compiled: whether this load had to compile (False: reused the cached file).
    """

    lib: ctypes.CDLL
    path: Path
    build_id: str
    compiled: bool


@lru_cache(maxsize=None)
def _build_recipe(cxx_env: Optional[str]) -> tuple[str, list[str], str]:
    """(source with its build id embedded, g++ command prefix, build id).

    Cached per process (it runs ``g++ --version``); ``cxx_env`` is ``$CXX``, the only input
    that can change between calls.
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(
            f"no C++ compiler: {os.environ.get('CXX', 'g++')!r} is not on PATH; install g++ "
            f"(apt-get install g++) or set CXX"
        )
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    flags = list(_BASE_FLAGS) + list(_arch_flags())
    # The event-driven synapse kernels (host only) share the library and its cache entry.
    src = kernel_source("host") + "\n" + SPIKE_MM_SOURCE.read_text()
    key = "\n".join([src, " ".join(flags), cxx, *version, _cpu_identity()])
    build_id = hashlib.sha256(key.encode()).hexdigest()[:24]
    # The id inside the library lets a load verify that the file is the one it asked for.
    src += f'\nextern "C" const char* lif_build_id(void) {{ return "{build_id}"; }}\n'
    return src, [cxx, *flags], build_id


def _try_load(path: Path, build_id: str) -> Optional[ctypes.CDLL]:
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.lif_build_id
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    if fn() != build_id.encode():
        return None
    return lib


def _compile(src: str, cmd: list[str], dest: Path) -> None:
    """Compile ``src`` with ``cmd`` into ``dest``, atomically: readers see no file or a whole one."""
    with atomic_path(dest, suffix=".so") as tmp, tempfile.TemporaryDirectory(dir=dest.parent) as d:
        src_path = Path(d) / (dest.stem + ".cpp")
        src_path.write_text(src)
        proc = subprocess.run([*cmd, str(src_path), "-o", str(tmp)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the CPU LIF kernels failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")


_LOCK = threading.Lock()
_LOADED: dict[str, CpuLibrary] = {}


def load_library(*, use_memory_cache: bool = True) -> CpuLibrary:
    """Load the kernel library, compiling it into the cache directory if needed.

    Args:
        use_memory_cache: reuse a library this process already loaded (tests pass False to
            exercise the disk cache).

    Raises:
        RuntimeError: no compiler, or the compile failed (the message carries its log).
    """
    src, cmd, build_id = _build_recipe(os.environ.get("CXX"))
    path = cache_dir() / f"lif_cpu_{build_id}.so"
    with _LOCK:
        if use_memory_cache and str(path) in _LOADED:
            return _LOADED[str(path)]
        lib = _try_load(path, build_id) if path.exists() else None
        compiled = False
        if lib is None:
            # Missing, unreadable or not ours (corrupt, truncated): build a fresh one. The new
            # file gets a new inode, so dlopen does not hand back a stale mapping.
            _compile(src, cmd, path)
            compiled = True
            lib = _try_load(path, build_id)
            if lib is None:
                raise RuntimeError(f"the freshly built {path} does not load; delete it and retry")
        _declare(lib)
        _declare_spike_mm(lib)
        if str(path) not in _LOADED:
            # First load in this process (a reload maps the same library: keep its setting).
            lib.lif_set_stream_min_bytes(last_level_cache_bytes())
        out = CpuLibrary(lib=lib, path=path, build_id=build_id, compiled=compiled)
        _LOADED[str(path)] = out
        return out


def compile_host_kernels(dest: Path, host_dtypes: tuple[str, ...]) -> ctypes.CDLL:
    """Compile the host build with entry points for ``host_dtypes`` (keys of
    ``source.HOST_DTYPES``) to ``dest``, outside the cache, and load it.

    The cpu backend's library has fp32 alone; the tests build the 16-bit instantiations this
    way to run, on a CPU, what the GPU runs for fp16 and bf16 tensors. Same compiler and flags
    as the backend's library.

    Raises:
        RuntimeError: no compiler, or the compile failed (the message carries its log).
    """
    _, cmd, _ = _build_recipe(os.environ.get("CXX"))
    _compile(kernel_source("host", tuple(host_dtypes)), cmd, dest)
    lib = ctypes.CDLL(str(dest))
    _declare(lib, tuple(host_dtypes))
    return lib


def _declare(lib: ctypes.CDLL, dtypes: tuple[str, ...] = ("float32",)) -> None:
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float
    for v in forward_variants(dtypes):
        fn = getattr(lib, v.c_symbol)
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i32, f32, f32, f32, i32]
        fn.restype = None
    for v in backward_variants(dtypes):
        fn = getattr(lib, v.c_symbol)
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i32, f32, f32, f32, f32, i32]
        fn.restype = None
    lib.lif_get_stream_min_bytes.argtypes = []
    lib.lif_get_stream_min_bytes.restype = i64
    lib.lif_set_stream_min_bytes.argtypes = [i64]
    lib.lif_set_stream_min_bytes.restype = None
    lib.lif_stream_copy.argtypes = [ptr, ptr, i64, i32]
    lib.lif_stream_copy.restype = None
    for name in ("lif_traffic_forward", "lif_traffic_backward"):
        getattr(lib, name).argtypes = [ptr, ptr, ptr, i64, i32, i32]
        getattr(lib, name).restype = None


def _declare_spike_mm(lib: ctypes.CDLL) -> None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    signatures = {
        "spk_count": ([ptr, i64, i64, ptr, i32], i64),
        "spk_fill": ([ptr, i64, i64, ptr, ptr, ptr, i32], None),
        "spk_linear_fwd": ([ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32], None),
        "spk_linear_wgrad": ([ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32], None),
        "spk_wgrad_scratch": ([i64, i64, i64, i32], i64),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype


_STATUS: list[Optional[str]] = []


def cpu_unavailable_reason() -> Optional[str]:
    """``None`` if the library loads (building it once if needed), else why not. Never raises."""
    if not _STATUS:
        try:
            load_library()
            _STATUS.append(None)
        except Exception as err:  # noqa: BLE001 - any failure becomes a reason, not a crash
            _STATUS.append(f"the CPU LIF kernel library is unavailable: {err}")
    return _STATUS[0]


@lru_cache(maxsize=None)
def _forward_fn(p: LIFParams, save: bool) -> Callable[..., None]:
    # Resolved once per option set: the per-call path is then one dict lookup and the call.
    return getattr(load_library().lib, forward_variant(p, "float32", save).c_symbol)


@lru_cache(maxsize=None)
def _backward_fn(p: LIFParams) -> Callable[..., None]:
    return getattr(load_library().lib, backward_variant(p, "float32").c_symbol)


_DEFAULT_LLC_BYTES = 32 << 20
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}  # sysfs cache sizes read "32768K"


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache cpu0 sees, from sysfs (what ``lscpu`` reports); 32 MiB
    when sysfs does not say. Not glibc's ``sysconf``: in a VM it can report the host's L3."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        try:
            value = int(size[:-1]) * _SIZE_UNITS[size[-1]] if size[-1] in _SIZE_UNITS else int(size)
        except (ValueError, IndexError):
            continue
        best = max(best, value)
    return best or _DEFAULT_LLC_BYTES


def stream_threshold() -> int:
    """Bytes a kernel call must write before its outputs bypass the cache (non-temporal
    stores, see ``lif_shim.h``). Defaults to :func:`last_level_cache_bytes`."""
    return int(load_library().lib.lif_get_stream_min_bytes())


def set_stream_threshold(nbytes: Optional[int]) -> None:
    """Set :func:`stream_threshold` for this process: 0 streams every output, a huge value
    none; ``None`` restores the default.

    Raises:
        ValueError: ``nbytes`` is negative.
    """
    if nbytes is not None and nbytes < 0:
        raise ValueError(
            f"nbytes={nbytes} must be >= 0 (0 streams every output) or None for the default "
            f"(the last-level cache size)"
        )
    lib = load_library().lib
    lib.lif_set_stream_min_bytes(last_level_cache_bytes() if nbytes is None else int(nbytes))


def _check_fp32(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous float32 CPU tensor, got {t.dtype} on {t.device} "
                f"(contiguous={t.is_contiguous()}); pass .float().contiguous()"
            )


# ----------------------------------------------------------------------------- benchmark support
# stream_copy and stream_traffic are the floors benchmarks/lif.py measures the kernels against;
# they are not part of the API (not in __all__) and nothing in the package calls them.
def stream_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(src)`` for contiguous fp32 CPU tensors with non-temporal stores on
    ``torch.get_num_threads()`` threads: the benchmarks' measure of the best copy bandwidth.

    Raises:
        ValueError: the tensors are not contiguous fp32 CPU tensors of the same size.
    """
    _check_fp32(src=src, dst=dst)
    if src.numel() != dst.numel():
        raise ValueError(f"src has {src.numel()} elements and dst {dst.numel()}; they must match")
    load_library().lib.lif_stream_copy(
        src.data_ptr(), dst.data_ptr(), src.numel(), torch.get_num_threads()
    )


def stream_traffic(pass_: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """A fused LIF pass's memory traffic without its arithmetic, laid out and streamed as the
    kernels do (``lif_traffic_*`` in ``lif_shim.h``), on ``torch.get_num_threads()`` threads:
    the benchmarks' measure of the most any kernel with that traffic can do on this machine.
    All three tensors are ``[steps, n]``.

    ``pass_`` "forward" reads ``a`` and writes ``b = a`` and ``out = a + 1`` (the forward's one
    input, two outputs); "backward" reads ``a`` and ``b`` and writes ``out = a + b``, last step
    first (two inputs, one output).

    Raises:
        ValueError: an unknown pass, or tensors that are not contiguous fp32 CPU tensors of one
            2-D shape.
    """
    if pass_ not in ("forward", "backward"):
        raise ValueError(f"pass_={pass_!r} must be 'forward' or 'backward'")
    _check_fp32(a=a, b=b, out=out)
    if a.dim() != 2 or b.shape != a.shape or out.shape != a.shape:
        raise ValueError(
            f"a, b and out must be [steps, n] of one shape, got {tuple(a.shape)}, {tuple(b.shape)} "
            f"and {tuple(out.shape)}"
        )
    steps, n = a.shape
    fn = getattr(load_library().lib, f"lif_traffic_{pass_}")
    fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), n, steps, torch.get_num_threads())


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class _CpuLauncher:
    """The host build of ``lif.cu`` (fp32), called through ctypes; large outputs come from
    the buffer pool (``mixersnn.kernels._alloc``)."""

    empty = staticmethod(empty_like_large)

    @staticmethod
    def forward(p: LIFParams, x: torch.Tensor, v0: Optional[torch.Tensor], spikes: torch.Tensor,
                u_saved: Optional[torch.Tensor], v_final: Optional[torch.Tensor], n: int, steps: int) -> None:  # fmt: skip
        _forward_fn(p, u_saved is not None)(
            x.data_ptr(), _ptr(v0), spikes.data_ptr(), _ptr(u_saved), _ptr(v_final),
            n, steps, 1.0 / p.tau, p.v_reset_charge, p.v_threshold, torch.get_num_threads(),
        )  # fmt: skip

    @staticmethod
    def backward(p: LIFParams, u_saved: torch.Tensor, gs: torch.Tensor, gv: Optional[torch.Tensor],
                 grad_x: torch.Tensor, grad_v0: Optional[torch.Tensor], n: int, steps: int) -> None:  # fmt: skip
        _backward_fn(p)(
            u_saved.data_ptr(), gs.data_ptr(), _ptr(gv), grad_x.data_ptr(), _ptr(grad_v0),
            n, steps, 1.0 / p.tau, p.v_reset_charge, p.v_threshold, p.alpha,
            torch.get_num_threads(),
        )  # fmt: skip


def lif_cpu(
    x_seq: torch.Tensor, v0: Optional[torch.Tensor], p: LIFParams, *, v_final: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The "cpu" backend: fused forward and backward on CPU tensors.

    Args:
        x_seq: input current ``[T, ...]``. fp32 runs the kernels; fp16/bf16 are computed in
            fp32 and cast back (results match the fp32 reference on the upcast input);
            float64 runs the reference loop, keeping its precision.
        v0: initial membrane ``[...]`` (``x_seq.shape[1:]``), or None to start from rest,
            ``p.v_rest`` (v_reset for a hard reset, 0 for a soft one; nothing is read).
        p: resolved neuron options.
        v_final: False: the final membrane is not written, and None is returned for it.

    Returns:
        ``(spikes [T, ...], v_final [...] or None)`` in ``x_seq``'s dtype.
    """
    require_device(x_seq, "cpu", "cpu")
    dtype = x_seq.dtype
    if dtype == torch.float64:
        # The kernels are fp32; float64 (gradcheck, numerics studies) keeps its precision
        # through the reference loop rather than being rounded.
        return lif_reference_backend(x_seq, v0, p, v_final=v_final)
    if dtype == torch.float32:
        return run_fused(x_seq, v0, p, _CpuLauncher, v_final)
    spikes, v_last = run_fused(x_seq.to(torch.float32), v0, p, _CpuLauncher, v_final)
    return spikes.to(dtype), None if v_last is None else v_last.to(dtype)
